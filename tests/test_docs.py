"""The README says what CI runs and lists every setting."""

import re
from pathlib import Path

from bfpack_spark.config import field_specs

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_quick_start():
    quick_start = README.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line for line in quick_start.strip().splitlines() if line.strip()]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert len(commands) == 2
    for command in commands:
        assert command in ci


def test_readme_documents_every_setting():
    for section, flag, f, _ in field_specs():
        assert f"`{section}.{f.name}`" in README, f"{section}.{f.name} missing from README"
        assert f"`--{flag}" in README


def test_conf_files_are_valid_configs():
    from bfpack_spark.config import load_config

    for path in (ROOT / "conf").glob("*.yaml"):
        config = load_config(str(path))
        assert config.packing.seq_len > 0, path
        assert re.match(r"(s3://|out/)", config.output.output), path
