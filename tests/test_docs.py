"""The README stays short and says what CI runs; the docs site builds, strictly, with every setting
and every table's schema rendered from the code."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bfpack_spark.cli import build_parser, main
from bfpack_spark.config import field_specs
from bfpack_spark.flags import flag_form, settings_markdown
from bfpack_spark.schemas import TABLES, schemas_markdown

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()


def test_the_readme_is_read_in_minutes():
    assert len(README.splitlines()) <= 250


def test_ci_runs_the_readme_quick_start():
    quick_start = README.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line for line in quick_start.strip().splitlines() if line.strip()]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert len(commands) == 2
    for command in commands:
        assert command in ci


def test_the_settings_page_lists_every_setting_as_the_command_line_takes_it():
    table = settings_markdown()
    pack_help = build_parser()._subparsers._group_actions[0].choices["pack"].format_help()  # noqa: SLF001
    for section, flag, f, hint in field_specs():
        row = next(line for line in table.splitlines() if line.startswith(f"| `{section}.{f.name}` |"))
        assert f"`{flag_form(flag, hint)}`" in row
        assert f"--{flag}" in pack_help and re.search(rf"\[{section}\.{f.name}[;\]]", pack_help)
    assert len(table.splitlines()) == len(field_specs()) + 2


def test_the_outputs_page_shows_every_column():
    rendered = schemas_markdown()
    for name, schema in TABLES.items():
        assert f"`{name}`" in rendered
        for column in schema.names:
            assert re.search(rf"^{column}\s", rendered, re.M), (name, column)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("docs") / "site"
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_the_docs_site_builds_strictly(site):
    page = (site / "guide" / "settings" / "index.html").read_text()
    assert "input.loss_mask_column" in page and "max_segments_per_sequence" in page
    assert "loss_mask" in (site / "guide" / "outputs" / "index.html").read_text()


@pytest.mark.parametrize("page", ["index.html", "training/index.html"])
def test_docs_pages_in_a_browser_cut_no_code(site, page, tmp_path):
    """Headless Chromium at a laptop's width: every code block wraps or fits (the quick start's long command
    is not cut off at the right edge), and code in a table cell is never broken mid-word. Screenshots in
    the test's output."""
    from browser import measure, screenshot

    path = site / page
    found = measure(path, """
        const blocks = [...document.querySelectorAll('pre > code')];
        const cut = blocks.filter(c => c.scrollWidth > c.clientWidth + 1).map(c => c.textContent.slice(0, 60));
        const broken = [...document.querySelectorAll('td code')]
            .filter(c => !/\\s/.test(c.textContent) && c.getClientRects().length > 1).map(c => c.textContent);
        return {blocks: blocks.length, cut, broken, cells: document.querySelectorAll('td code').length};""", 1280)
    assert found["blocks"] > 0 and found["cut"] == [] and found["broken"] == [], found
    assert page != "training/index.html" or found["cells"] > 10
    assert screenshot(path, tmp_path / (page.replace("/", "-") + ".png"), 1280, 2000).stat().st_size > 20_000


def test_conf_files_are_valid_configs():
    from bfpack_spark.config import load_config

    for path in (ROOT / "conf").glob("*.yaml"):
        config = load_config(str(path))
        assert config.packing.seq_len > 0, path
        assert re.match(r"(s3://|out/)", config.output.output), path


def test_bfpack_version_is_the_installed_package_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"bfpack {version('bfpack-spark')}"
