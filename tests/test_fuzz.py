"""Random bad records and random valid settings: every run ends as a correct run (read =
packed + rejected, every packed token in the tables), or with a user error of one line, or with
the reject limit; never with a crash."""

import json

import pyarrow.dataset as pads
from deltalake import DeltaTable
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bfpack_spark.config import ConfigError, load_config
from bfpack_spark.errors import InputError
from bfpack_spark.job import AuditError, run
from bfpack_spark.tokenize import TokenizerError

WORDS = ["packing", "best", "fit", "token", "<|endoftext|>", "é", "😀", " ", "\n", "def f():"]

text = st.lists(st.sampled_from(WORDS), min_size=0, max_size=400).map("".join)
good = st.builds(lambda i, t: json.dumps({"id": f"d{i}", "text": t}).encode(), st.integers(0, 30), text)
bad = st.one_of(
    st.just(b"{not json"),                                         # malformed
    st.just(b"[1, 2, 3]"),                                         # not an object
    st.just(b""),                                                  # blank line
    st.just(b'{"id": "u", "text": "caf\xe9"}'),                    # invalid UTF-8
    st.builds(lambda v: json.dumps({"id": "t", "text": v}).encode(),
              st.one_of(st.none(), st.integers(), st.lists(st.integers(), max_size=3))),  # wrong text type
    st.builds(lambda v: json.dumps({"id": v, "text": "x"}).encode(),
              st.one_of(st.none(), st.just(""), st.integers(), st.just({"a": 1}))),      # odd ids
    st.just(json.dumps({"id": "big", "text": "word " * 4000}).encode()),              # large
    st.just(b'{"id": "cut", "text": "trunc'),                       # truncated last line
)
lines = st.lists(st.one_of(good, good, bad), min_size=1, max_size=25)
flags = st.fixed_dictionaries({
    "packing.seq_len": st.sampled_from([16, 64, 512]),
    "packing.strategy": st.sampled_from(["bfd", "concat"]),
    "quality.duplicate_ids": st.sampled_from(["skip", "keep"]),
    "quality.empty_documents": st.sampled_from(["skip", "keep"]),
    "quality.max_document_bytes": st.sampled_from([1_000, 1_000_000]),
    "quality.max_reject_fraction": st.sampled_from([0.3, 1.0]),
})


def rows(out, name):
    return pads.dataset(DeltaTable(str(out / name)).file_uris(), format="parquet").to_table()


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(lines=lines, flags=flags)
def test_random_bad_records_and_settings_never_crash(spark, tmp_path_factory, lines, flags):
    root = tmp_path_factory.mktemp("fuzz")
    (root / "in").mkdir()
    (root / "in" / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    config = {"input.paths": [str(root / "in")], "output.output": str(root / "out"), **flags}
    try:
        result = run(load_config(None, config), spark)
    except (ConfigError, InputError, TokenizerError) as exc:  # exit 2: one line
        assert str(exc) and "\n" not in str(exc)
        return
    except AuditError as exc:  # exit 1: the reject limit
        assert "max_reject_fraction" in str(exc)
        return
    s = result.stats
    assert s["audit_passed"] and s["documents_read"] == s["documents_packed"] + s["documents_rejected"]
    assert rows(root / "out", "rejects").num_rows == s["documents_rejected"]
    assert rows(root / "out", "documents").num_rows == s["documents_packed"]
    sequences = rows(root / "out", "sequences")
    tokens = sum(len(t) for t in sequences.column("input_ids").to_pylist()) if sequences.num_rows else 0
    assert tokens == s["tokens"]
