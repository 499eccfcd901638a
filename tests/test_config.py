"""The config model: YAML, overrides, validation, fingerprints."""

import pytest

from bfpack_spark.config import ConfigError, default_run_id, load_config


def test_numbers_spelled_differently_are_the_same_config(tmp_path):
    (tmp_path / "a.yaml").write_text("packing:\n  residual_fill: 1\nquality:\n  max_reject_fraction: 1\n")
    a = load_config(str(tmp_path / "a.yaml"))
    b = load_config(None, {"packing.residual_fill": 1.0, "quality.max_reject_fraction": 1.0})
    assert a.fingerprint() == b.fingerprint()
    assert isinstance(a.packing.residual_fill, float)


def test_run_id_ignores_where_and_how_but_not_what():
    base = load_config(None, {"input.paths": ["x"], "output.output": "out/a"})
    elsewhere = load_config(None, {"input.paths": ["x"], "output.output": "out/b", "spark.master": "local[1]"})
    longer = load_config(None, {"input.paths": ["x"], "output.output": "out/a", "packing.seq_len": 4096})
    moved = load_config(None, {"input.paths": ["/data/x"], "output.output": "out/a"})
    listing = [("x", 10, "d1")]
    assert default_run_id(base, listing) == default_run_id(elsewhere, listing) == default_run_id(moved, listing)
    assert default_run_id(base, listing) != default_run_id(longer, listing)
    assert default_run_id(base, listing) != default_run_id(base, [("x", 10, "d2")])


@pytest.mark.parametrize("overrides, message", [
    ({"packing.strategy": "greedy"}, "packing.strategy: 'greedy' is not one of bfd, concat"),
    ({"packing.partitions": 0}, "packing.partitions: must be at least 1"),
    ({"tokenizer.append_eos": "yes"}, "tokenizer.append_eos: expected true or false"),
    ({"input.paths": []}, "input.paths: no input given"),
    ({"quality.empty_documents": "keep", "tokenizer.append_eos": False}, "needs tokenizer.append_eos"),
    ({"input.format": "text", "input.token_column": "tokens"}, "text files hold text"),
    ({"spark.master": "nonsense://x"}, "spark.master: 'nonsense://x' is not a master URL"),
])
def test_validation_names_the_field(overrides, message):
    settings = {"input.paths": ["x"], "output.output": "out"}
    settings.update(overrides)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(None, settings).validate()


def test_unknown_sections_and_keys(tmp_path):
    (tmp_path / "c.yaml").write_text("packer:\n  seq_len: 1\n")
    with pytest.raises(ConfigError, match="packer: unknown section"):
        load_config(str(tmp_path / "c.yaml"))
