"""Nothing the terminal or the PDF prints can be spoofed: hidden and bidirectional format
characters in any user-supplied string (title, prompt, trigger word, metadata, file name) are
shown as their code point, ``<U+202E>``, by one rule (report/text.visible). docs/hostile/spoof.md."""

from __future__ import annotations

import subprocess

import numpy as np
from click.testing import CliRunner
from conftest import write_case
from safetensors.numpy import save_file

from carlos_audit.case.casefile import load_case
from carlos_audit.cli import main
from carlos_audit.cli.common import safe_text
from carlos_audit.pipeline import run_full
from carlos_audit.report.templating import jinja_env
from carlos_audit.report.text import visible

RLO, PDF_ = "\u202e", "\u202c"
TRIGGER = f"tgt{RLO}elyts{PDF_}"
PROMPT = f"a cat {RLO}tac a{PDF_} on a mat"
TITLE = f"exhibit {RLO}gnp.exe{PDF_}"


def pdftext_raw(pdf) -> str:
    return subprocess.run(["pdftotext", "-raw", str(pdf), "-"], capture_output=True, text=True, check=True).stdout


def test_visible_marks_every_hidden_kind_and_keeps_ordinary_text():
    assert visible(TRIGGER) == "tgt<U+202E>elyts<U+202C>"
    for ch in ["\u202a", "\u202d", "\u2066", "\u2069", "\u200b", "\u200d", "\u200e", "\u2060", "\ufeff",
               "\x00", "\x1b", "\x7f", "\x85", "\u2028", "\u00ad", "\u3164", "\ufe0f", "\U000e0041", "\ue000"]:
        assert visible(f"a{ch}b") == f"a<U+{ord(ch):04X}>b", repr(ch)
    ordinary = "Ünïcödé — café, 東京, Ελληνικά, emoji 🎨, 1,234 bytes… (n=3) <b>&"
    assert visible(ordinary) == ordinary
    assert visible("two\nlines\tand tab") == "two<U+000A>lines<U+0009>and tab"
    assert visible("two\nlines", keep="\n") == "two\nlines"


def test_terminal_and_templates_follow_the_same_rule():
    assert safe_text(PROMPT, 200) == visible(PROMPT)
    html = jinja_env().from_string("{{ a }}|{{ b | join(', ') }}").render(a=PROMPT, b=[TRIGGER, "<i>"])
    assert html == "a cat &lt;U+202E&gt;tac a&lt;U+202C&gt; on a mat|tgt&lt;U+202E&gt;elyts&lt;U+202C&gt;, &lt;i&gt;"


def test_pdf_shows_hidden_characters_of_title_prompt_and_trigger(lite_assets, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT}\na bowl of soup on a table\n", encoding="utf-8")
    cf = write_case(tmp_path, lite_assets, case_id="spoof", prompts=str(prompts), seeds="{ count = 1, start = 0 }",
                    steps=2, trigger_words='["tgt\\u202Eelyts\\u202C"]')
    cf.write_text(cf.read_text().replace('title = "test case"', 'title = "exhibit \\u202Egnp.exe\\u202C"'))
    case = load_case(cf)
    assert case.lora.trigger_words == [TRIGGER] and case.case.title == TITLE
    out = tmp_path / "case"
    run_full(case, out, progress=False)
    text = pdftext_raw(out / "report.pdf")
    assert "tgt<U+202E>elyts<U+202C>" in text
    assert "a cat <U+202E>tac a<U+202C> on a mat" in text
    assert "exhibit <U+202E>gnp.exe<U+202C>" in text
    assert RLO not in text and PDF_ not in text
    assert "a bowl of soup on a table" in text  # ordinary strings as they were


def test_inspect_and_error_lines_show_hidden_characters(tmp_path):
    rng = np.random.default_rng(0)
    key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    tensors = {f"{key}.lora_down.weight": rng.standard_normal((4, 64)).astype(np.float32),
               f"{key}.lora_up.weight": rng.standard_normal((64, 4)).astype(np.float32)}
    p = tmp_path / "m.safetensors"
    save_file(tensors, str(p), metadata={"ss_output_name": TRIGGER, f"key{RLO}x": "v"})
    result = CliRunner().invoke(main, ["inspect", str(p)])
    assert result.exit_code == 0, result.output
    assert "tgt<U+202E>elyts<U+202C>" in result.output and "key<U+202E>x" in result.output
    assert RLO not in result.output

    missing = tmp_path / f"gnp{RLO}exe.safetensors"
    result = CliRunner().invoke(main, ["inspect", str(missing)])
    assert result.exit_code != 0
    assert "gnp<U+202E>exe" in result.output and RLO not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_demo_report_has_no_marker(demo_case_dir):
    """The demo's strings are ordinary text: nothing in its report is changed by the rule."""
    from carlos_audit.report.context import build_context
    from carlos_audit.report.render import load_inputs
    from carlos_audit.report.templating import render_html

    html = render_html(build_context(load_inputs(demo_case_dir), "filing"))
    assert "&lt;U+" not in html and "<U+" not in html
    text = pdftext_raw(demo_case_dir / "report.pdf")
    assert "<U+" not in text and "tgtstyle" in text
