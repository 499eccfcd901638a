"""The training-side reader: per-rank shards, masks, resume, torchrun, and the exports, on a
table packed by the real pipeline."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
from deltalake import DeltaTable

from bfpack_spark.config import load_config
from bfpack_spark.job import run

from corpora import write_tokenized

torch = pytest.importorskip("torch")
from torch.utils.data import DataLoader  # noqa: E402

from bfpack_spark.loader import PackedSequences, collate  # noqa: E402

L = 256


@pytest.fixture(scope="module")
def packed(spark, tmp_path_factory):
    """A packed table (L=256, documents up to ~20 L long), its rows by seq_id, and the documents."""
    corpus = tmp_path_factory.mktemp("loader-corpus")
    docs = write_tokenized(corpus, n_files=3, docs_per_file=300, median=120, sigma=1.3, seed=7, row_group=100)
    out = tmp_path_factory.mktemp("loader-out")
    run(load_config(None, {"input.paths": [str(corpus)], "input.token_column": "tokens", "output.output": str(out),
                           "packing.seq_len": L, "input.target_items_per_partition": 300}), spark)
    rows = table_rows(out, "sequences")
    return out, {r["seq_id"]: r for r in rows}, docs


def table_rows(out: Path, name: str) -> list[dict]:
    return pads.dataset(DeltaTable(str(out / name)).file_uris(), format="parquet").to_table().to_pylist()


def expected_labels(tokens: list[int], seg_lengths: list[int]) -> list[int]:
    """The rule, spelled out: the next token when it is in the same segment, else -100."""
    segment = [s for s, n in enumerate(seg_lengths) for _ in range(n)]
    out = [-100] * L
    for i in range(len(tokens) - 1):
        if segment[i] == segment[i + 1]:
            out[i] = tokens[i + 1]
    return out


def test_three_ranks_cover_every_sequence_once_with_the_right_fields(packed):
    out, rows, docs = packed
    assert len({r["n_tokens"] < L for r in rows.values()}) == 2, "want full and padded sequences"
    shards = [list(PackedSequences(str(out), rank=r, world_size=3, seed=3)) for r in range(3)]
    ids = [[e["seq_id"] for e in s] for s in shards]
    assert sorted(i for s in ids for i in s) == sorted(rows), "every sequence exactly once"
    assert max(map(len, ids)) - min(map(len, ids)) <= 1
    assert [len(PackedSequences(str(out), rank=r, world_size=3)) for r in range(3)] == list(map(len, ids))
    for e in (e for s in shards for e in s):
        row = rows[e["seq_id"]]
        n = sum(e["seq_lens"].tolist())
        assert e["seq_lens"].tolist() == row["seg_lengths"] and n == row["n_tokens"]
        assert e["input_ids"][:n].tolist() == row["input_ids"]
        assert (e["input_ids"][n:] == 0).all()  # tokenized input without EOS: pad id 0
        positions = [p for k in row["seg_lengths"] for p in range(k)] + list(range(L - n))
        assert e["position_ids"].tolist() == positions
        assert e["labels"].tolist() == expected_labels(row["input_ids"], row["seg_lengths"])


def test_drop_last_gives_equal_shards_and_continuous_positions(packed):
    out, rows, docs = packed
    shards = [list(PackedSequences(str(out), rank=r, world_size=4, drop_last=True, position_ids="continuous"))
              for r in range(4)]
    assert len({len(s) for s in shards}) == 1 and len(rows) - 4 * len(shards[0]) < 4
    assert len({e["seq_id"] for s in shards for e in s}) == 4 * len(shards[0])
    assert shards[0][0]["position_ids"].tolist() == list(range(L))


def test_order_is_a_function_of_seed_and_epoch(packed):
    out, _, _ = packed
    a, b = PackedSequences(str(out), seed=5), PackedSequences(str(out), seed=5)
    first = [e["seq_id"] for e in a]
    assert first == [e["seq_id"] for e in b]
    a.set_epoch(1)
    second = [e["seq_id"] for e in a]
    assert second != first and sorted(second) == sorted(first)
    unshuffled = [e["seq_id"] for e in PackedSequences(str(out), shuffle=False)]
    assert unshuffled != first and sorted(unshuffled) == sorted(first)


def test_dataloader_workers_split_a_rank_without_overlap(packed):
    out, _, _ = packed
    alone = sorted(e["seq_id"] for e in PackedSequences(str(out), rank=1, world_size=2, seed=9))
    loader = DataLoader(PackedSequences(str(out), rank=1, world_size=2, seed=9), batch_size=8, num_workers=2,
                        collate_fn=collate)
    seen = [i for batch in loader for i in batch["seq_id"].tolist()]
    assert sorted(seen) == alone


def test_resume_yields_exactly_what_was_left(packed):
    out, _, _ = packed
    ds = PackedSequences(str(out), seed=1)
    ds.set_epoch(2)
    reference = PackedSequences(str(out), seed=1)
    reference.set_epoch(2)
    full = [e["seq_id"] for e in reference]
    it = iter(ds)
    head = [next(it)["seq_id"] for _ in range(37)]
    state = ds.state_dict()
    resumed = PackedSequences(str(out), seed=1)
    resumed.load_state_dict(state)
    assert head + [e["seq_id"] for e in resumed] == full
    with pytest.raises(ValueError, match="seed"):
        PackedSequences(str(out), seed=2).load_state_dict(state)


def test_stateful_dataloader_with_workers_resumes_mid_epoch(packed):
    from torchdata.stateful_dataloader import StatefulDataLoader

    out, rows, docs = packed

    def loader():
        return StatefulDataLoader(PackedSequences(str(out), rank=0, world_size=1, seed=4), batch_size=4,
                                  num_workers=2, collate_fn=collate)

    first = loader()
    seen = []
    for i, batch in enumerate(first):
        seen += batch["seq_id"].tolist()
        if i == 6:
            state = first.state_dict()
            break
    second = loader()
    second.load_state_dict(state)
    rest = [i for batch in second for i in batch["seq_id"].tolist()]
    assert len(seen) == 28 and not set(seen) & set(rest)
    assert sorted(seen + rest) == sorted(rows)


def test_collate_gives_varlen_boundaries_and_the_sdpa_mask(packed):
    out, _, _ = packed
    examples = list(PackedSequences(str(out), shuffle=False))[:5]
    batch = collate(examples, sdpa_mask=True)
    bounds = [0]
    for e in examples:
        segs = e["seq_lens"].tolist()
        segs += [L - sum(segs)] if sum(segs) < L else []
        bounds += (bounds[-1] + np.cumsum(segs)).tolist()
    assert batch["cu_seqlens"].tolist() == bounds and batch["cu_seqlens"][-1] == 5 * L
    assert batch["max_seqlen"] == int(np.diff(bounds).max())
    mask = batch["attention_mask"]
    assert mask.shape == (5, 1, L, L) and mask.dtype == torch.bool
    first = examples[0]["seq_lens"].tolist()
    if len(first) > 1:  # the first token of the second segment sees itself, not the first segment
        assert mask[0, 0, first[0], first[0]] and not mask[0, 0, first[0], 0]


def test_two_ranks_under_torchrun_read_disjoint_shards(packed, tmp_path):
    out, rows, docs = packed
    result = tmp_path / "seen.json"
    script = Path(__file__).parent / "torchrun_shards.py"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(out), str(result)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(result.read_text())
    assert len(seen) == 2 and not set(seen["0"]) & set(seen["1"])
    assert sorted(seen["0"] + seen["1"]) == sorted(rows)


class TinyCausalAttention(torch.nn.Module):
    """One causal self-attention layer with learned absolute positions (so position ids matter)."""

    def __init__(self, vocab: int = 100_000, dim: int = 16, heads: int = 2):
        super().__init__()
        torch.manual_seed(0)
        self.heads = heads
        self.embed = torch.nn.Embedding(vocab, dim)
        self.position = torch.nn.Embedding(L, dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)

    def forward(self, ids, positions, mask=None):
        x = self.embed(ids) + self.position(positions)
        b, n, d = x.shape
        q, k, v = (t.view(b, n, self.heads, d // self.heads).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        if mask is None:
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(b, n, d))


def test_packed_attention_equals_each_document_alone(packed):
    """With the loader's mask and position ids, a packed batch computes what each segment alone
    computes; also for a document cut into chunks in several sequences."""
    out, rows, docs = packed
    model = TinyCausalAttention().double()
    documents = table_rows(out, "documents")
    spanning = next(d["doc_id"] for d in documents if d["n_chunks"] >= 3)
    holders = sorted(i for i, r in rows.items() if spanning in r["doc_ids"])
    multi = [i for i, r in rows.items() if len(r["seg_lengths"]) >= 3][:3]
    padded = [i for i, r in rows.items() if r["n_tokens"] < L][:1]
    wanted = set(holders + multi + padded)
    examples = [e for e in PackedSequences(str(out), shuffle=False) if e["seq_id"] in wanted]
    batch = collate(examples, sdpa_mask=True)
    with torch.no_grad():
        packed_out = model(batch["input_ids"], batch["position_ids"], batch["attention_mask"])
        flat = packed_out.reshape(-1, packed_out.shape[-1])
        cu = batch["cu_seqlens"].tolist()
        varlen = torch.cat([model(batch["input_ids"].reshape(1, -1)[:, a:b],
                                  batch["position_ids"].reshape(1, -1)[:, a:b])[0] for a, b in zip(cu, cu[1:])])
        assert (varlen - flat).abs().max() < 1e-5  # cu_seqlens cut where the mask does
        chunks = {}
        for b, e in enumerate(examples):
            row, start = rows[e["seq_id"]], 0
            for doc_id, seg_start, n in zip(row["doc_ids"], row["seg_starts"], row["seg_lengths"]):
                tokens = torch.tensor(row["input_ids"][start:start + n]).unsqueeze(0)
                alone = model(tokens, torch.arange(n).unsqueeze(0))[0]
                assert (packed_out[b, start:start + n] - alone).abs().max() < 1e-5, (e["seq_id"], doc_id)
                if doc_id == spanning:
                    chunks[seg_start] = row["input_ids"][start:start + n]
                start += n
    assert len(chunks) >= 3 and len(holders) >= 3
    document = next(d for d in documents if d["doc_id"] == spanning)
    rebuilt = [t for s in sorted(chunks) for t in chunks[s]]
    assert rebuilt == docs[spanning] and len(rebuilt) == document["n_tokens"]


def test_export_hf_opens_with_load_from_disk(spark, packed, tmp_path, capfd):
    datasets = pytest.importorskip("datasets")
    from bfpack_spark.export import export

    out, rows, _ = packed
    summary = export(str(out), "hf", str(tmp_path / "hf"), spark=spark)
    assert "%|" not in capfd.readouterr().err and datasets.is_progress_bar_enabled()  # no bars, and restored
    dataset = datasets.load_from_disk(str(tmp_path / "hf"))
    assert dataset.num_rows == len(rows) == summary["sequences"]
    assert dataset.column_names == ["input_ids", "seq_lengths", "seq_id", "run_id"]  # TRL builds positions
    for example in dataset:
        row = rows[example["seq_id"]]
        assert example["input_ids"] == row["input_ids"] and example["seq_lengths"] == row["seg_lengths"]


def test_the_loader_reads_one_snapshot_one_run_and_no_orphan(spark, packed, tmp_path):
    out, rows, _ = packed
    root = tmp_path / "root"
    shutil.copytree(out, root)
    first_run = PackedSequences(str(root)).snapshot.run_ids[0]
    orphan = next((root / "sequences").glob("run-*/**/*.parquet"))
    (root / "sequences" / "run-orphan-0000abcd").mkdir()
    shutil.copy(orphan, root / "sequences" / "run-orphan-0000abcd" / "left-by-a-killed-run.parquet")
    more = tmp_path / "more"
    write_tokenized(more, n_files=1, docs_per_file=50, median=120, seed=8)
    run(load_config(None, {"input.paths": [str(more)], "input.token_column": "tokens", "output.output": str(root),
                           "packing.seq_len": L, "output.mode": "append",
                           "quality.duplicate_ids": "keep"}), spark)  # its ids are the first run's
    both = PackedSequences(str(root), shuffle=False)
    assert len(both.snapshot.run_ids) == 2 and len(both) > len(rows)
    only_first = [e["seq_id"] for e in PackedSequences(str(root), run_id=first_run)]
    assert sorted(only_first) == sorted(rows)
    old = PackedSequences(str(root), version=0)
    assert len(old) == len(rows) and old.snapshot.version == 0
    seen = [(e["run_id"], e["seq_id"]) for e in both]
    assert len(seen) == len(set(seen)) == len(both)
