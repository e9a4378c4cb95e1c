"""Section numbers, computed while the template renders: nothing in a template is numbered by hand.

A section partial writes its headings through the ``outline`` object in the template context:

    {{ outline.chapter("results", "Results") }}            <h1 id="results">3 Results</h1>
    {{ outline.chapter("indicators", "Further indicators", supplement=True) }}   3A ... (belongs to 3)
    {{ outline.section("Metrics") }}                        <h2>3.1 Metrics</h2>
    {{ outline.section("Arms", id="arms") }}                <h2 id="arms">2.5 Arms</h2>
    {{ outline.appendix("appendix-custody", "Chain of custody") }}   Appendix B: Chain of custody
    {{ outline.closing("expert-closing", "Declarations") }}  <h1>Declarations</h1> (unnumbered, last)
    see {{ outline.ref("arms") }}                          see section 2.5  (also forward references)

The report is rendered twice: the first pass assigns the numbers, the second prints them, so a
reference or the table of contents may point forward. Both passes must number alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from markupsafe import Markup

from carlos_audit.errors import AuditError


@dataclass(frozen=True)
class Heading:
    id: str
    number: str      # "3", "3A", "2.5", "A", "B.1"
    label: str       # what the heading shows: "3 Results", "Appendix B: Chain of custody"
    level: int       # 1 chapter or appendix, 2 section
    appendix: bool
    closing: bool = False   # the unnumbered closing part after the appendices, and its sections


class Outline:
    """Numbers chapters (1, 2, ...; supplements 3A, 3B), appendices (A, B, ...) and their
    sections (2.1, 2.2, A.1); keeps every heading for the contents and for references."""

    def __init__(self, previous: list[Heading] | None = None):
        self.previous = None if previous is None else {h.id: h for h in previous}
        self.previous_list = previous or []
        self.headings: list[Heading] = []
        self._chapter = 0
        self._supplement = 0
        self._appendix = 0
        self._current = ""
        self._in_appendix = False
        self._section = 0
        self._auto = 0
        self._closing = False

    # --- headings

    def _add(self, id: str | None, number: str, label: str, level: int) -> Heading:
        if id is None:
            self._auto += 1
            id = f"s-{self._auto}"
        if any(h.id == id for h in self.headings):
            raise AuditError(f"report template: heading id {id!r} used twice")
        h = Heading(id, number, label, level, self._in_appendix, self._closing)
        self.headings.append(h)
        return h

    def chapter(self, id: str, title: str, *, supplement: bool = False) -> Markup:
        """A chapter heading (h1): the next number, or with ``supplement`` the previous chapter's
        number and a letter (an addition to that chapter, e.g. 3A after 3)."""
        self._check_open(id)
        if supplement and self._chapter and not self._in_appendix:
            self._supplement += 1
            number = f"{self._chapter}{chr(ord('A') + self._supplement - 1)}"
        else:
            if self._in_appendix:
                raise AuditError(f"report template: chapter {id!r} comes after the appendices")
            self._chapter += 1
            self._supplement = 0
            number = str(self._chapter)
        self._current, self._section = number, 0
        h = self._add(id, number, f"{number} {title}", 1)
        return Markup('<h1 id="{}">{}</h1>').format(h.id, h.label)

    def appendix(self, id: str, title: str) -> Markup:
        self._check_open(id)
        self._appendix += 1
        self._in_appendix = True
        letter = chr(ord("A") + self._appendix - 1)
        self._current, self._section = letter, 0
        h = self._add(id, letter, f"Appendix {letter}: {title}", 1)
        return Markup('<h1 id="{}">{}</h1>').format(h.id, h.label)

    def closing(self, id: str, title: str) -> Markup:
        """The unnumbered part that ends the report, after the appendices (what a rule wants "at
        the end of an expert's report"). Only its own sections, unnumbered, may follow it."""
        self._check_open(id)
        self._closing = True
        self._current, self._section = title, 0
        h = self._add(id, "", title, 1)
        return Markup('<h1 id="{}">{}</h1>').format(h.id, h.label)

    def _check_open(self, id: str) -> None:
        if self._closing:
            raise AuditError(f"report template: heading {id!r} comes after the closing part")

    def section(self, title: str, id: str | None = None, cls: str = "", numbered: bool = True) -> Markup:
        """A section heading (h2) inside the current chapter or appendix (unnumbered in the
        closing part)."""
        numbered = numbered and not self._closing
        if not self._current:
            raise AuditError(f"report template: section {title!r} comes before any chapter")
        if numbered:
            self._section += 1
            number = f"{self._current}.{self._section}"
            label = f"{number} {title}"
        else:
            number, label = "", title
        h = self._add(id, number, label, 2)
        attrs = Markup(' class="{}"').format(cls) if cls else Markup("")
        return Markup('<h2 id="{}"{}>{}</h2>').format(h.id, attrs, h.label)

    # --- references and contents (from the first pass)

    def number(self, id: str) -> str:
        """The number of a heading anywhere in the report ("2.5", "3A", "B")."""
        if self.previous is None:
            return "?"  # first pass: not known yet
        if id not in self.previous:
            raise AuditError(f"report template refers to section {id!r}, which this report does not have")
        return self.previous[id].number

    def ref(self, id: str) -> str:
        """How the text names a heading: "section 2.5", "section 3A", "Appendix B", and the
        closing part by its title: "“Declarations” at the end of the report"."""
        n = self.number(id)
        if self.previous is not None and self.previous[id].closing:
            return f"“{self.previous[id].label}” at the end of the report"
        appendix = self.previous is not None and self.previous[id].appendix and self.previous[id].level == 1
        return f"Appendix {n}" if appendix else f"section {n}"

    def has(self, id: str) -> bool:
        return self.previous is not None and id in self.previous

    def contents(self) -> list[Heading]:
        """The chapters and appendices, for the table of contents."""
        return [h for h in self.previous_list if h.level == 1]


def check_same(first: list[Heading], second: list[Heading]) -> None:
    if [(h.id, h.number) for h in first] != [(h.id, h.number) for h in second]:
        raise AuditError("report template numbers its headings differently on the second pass (a heading depends on a reference)")
