"""Where the report's templates are, and the only URL fetcher the PDF renderer may use.

The templates live in the top-level ``templates/`` folder of a source checkout; a wheel ships
the same files as the package ``carlos_audit/templates/`` (pyproject.toml maps one onto the
other). ``templates_dir()`` finds them in either layout.

Text that comes from the LoRA file, the prompts or a corpus is hostile until shown otherwise:
weasyprint gets a URL fetcher that serves only files inside the case folder and the templates
folder, and refuses everything else (http, https, other files). The reproduction PDF and any
other document in the report's style use the same fetcher (``make_url_fetcher``).
"""

from __future__ import annotations

import functools
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit
from urllib.request import url2pathname

from carlos_audit.errors import AuditError

PACKAGE_DIR = Path(__file__).resolve().parents[1]          # carlos_audit/
TEMPLATE_DIRS = (PACKAGE_DIR.parent / "templates",            # a source checkout (and pip install -e)
                 PACKAGE_DIR / "templates")                   # an installed wheel
MAIN_TEMPLATE = "report.html.j2"
STYLESHEET = "report.css"
CASE_URL = "file:///carlos-audit-case/"            # virtual roots: see CaseOnlyFetcher
TEMPLATES_URL = "file:///carlos-audit-templates/"


def templates_dir() -> Path:
    """The folder holding report.html.j2, report.css and sections/ (checkout or wheel)."""
    for d in TEMPLATE_DIRS:
        if (d / MAIN_TEMPLATE).is_file():
            return d
    raise AuditError("report templates not found (looked in " + ", ".join(str(d) for d in TEMPLATE_DIRS)
                     + "): reinstall carlos-audit")


@functools.lru_cache(maxsize=1)
def fetcher_classes():
    """(CaseOnlyFetcher, RefusedFetch), built on first use so that weasyprint loads lazily."""
    from weasyprint.urls import FatalURLFetchingError, URLFetcher, URLFetcherResponse

    class RefusedFetch(FatalURLFetchingError):
        """A resource outside the case and templates folders: rendering stops."""

    class CaseOnlyFetcher(URLFetcher):
        """Serves files inside the allowed folders (and data: URIs); refuses anything else.

        The document only knows the folders by virtual URLs (``file:///carlos-audit-case/...``,
        ``file:///carlos-audit-templates/...``), so no real path of this machine enters the PDF
        (weasyprint names images after their URL) and the same case renders to the same bytes
        wherever its folder lies. Weasyprint asks this object for every stylesheet, image and
        attachment it loads; refusing raises an error that stops the rendering, so a report can
        never be made with a resource fetched from the network or from elsewhere on the machine.
        """

        MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
                ".svg": "image/svg+xml", ".css": "text/css"}

        def __init__(self, roots: dict[str, Path]):
            super().__init__(allowed_protocols=("file", "data"), allow_redirects=False, fail_on_errors=False)
            self.roots = {name: Path(r).resolve() for name, r in roots.items()}
            self.served: list[str] = []
            self.refused: list[str] = []

        def resolve(self, url: str) -> Path | None:
            """The real file behind a virtual file URL, or None when it is not allowed."""
            parts = PurePosixPath(url2pathname(urlsplit(url).path)).parts
            if len(parts) < 3 or parts[0] != "/" or parts[1] not in self.roots:
                return None
            root = self.roots[parts[1]]
            path = root.joinpath(*parts[2:]).resolve()  # follows symlinks and ..: must stay inside
            if not path.is_relative_to(root) or not path.is_file() or path.suffix.lower() not in self.MIME:
                return None
            return path

        def fetch(self, url, headers=None):
            scheme = urlsplit(url).scheme.lower()
            if scheme == "data":
                return super().fetch(url, headers)
            path = self.resolve(url) if scheme == "file" else None
            if path is None:
                self.refused.append(url)
                raise RefusedFetch(f"refused to fetch {url[:200]!r}: only files inside the case folder and the templates folder are served")
            self.served.append(url)
            return URLFetcherResponse(url, body=path.read_bytes(), headers={"Content-Type": self.MIME[path.suffix.lower()]})

    return CaseOnlyFetcher, RefusedFetch


def make_url_fetcher(case_dir: Path, templates: Path | None = None):
    """The report's URL fetcher: CASE_URL serves the case folder, TEMPLATES_URL the templates."""
    cls, _ = fetcher_classes()
    return cls({CASE_URL.split("/")[3]: case_dir, TEMPLATES_URL.split("/")[3]: templates or templates_dir()})
