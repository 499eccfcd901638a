"""Small real corpora written to disk for the pipeline tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def lognormal_lengths(n: int, median: float, sigma: float, rng: np.random.Generator) -> np.ndarray:
    return np.maximum(rng.lognormal(np.log(median), sigma, n).astype(np.int64), 1)


def write_tokenized(root: Path, n_files: int = 4, docs_per_file: int = 1500, median: float = 300,
                    sigma: float = 1.3, seed: int = 0, row_group: int = 500,
                    by_length: bool = False) -> dict[str, list[int]]:
    """Parquet files with columns id, tokens (list<int32>); returns {id: tokens}. ``by_length``: the
    documents sorted by length across the files (each file holds one length range)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    docs: dict[str, list[int]] = {}
    everyone = np.sort(lognormal_lengths(n_files * docs_per_file, median, sigma, rng)) if by_length else None
    for f in range(n_files):
        lengths = (everyone[f * docs_per_file:(f + 1) * docs_per_file] if everyone is not None
                   else lognormal_lengths(docs_per_file, median, sigma, rng))
        ids = [f"f{f}-d{i}" for i in range(docs_per_file)]
        tokens = [rng.integers(0, 100_000, n, dtype=np.int32) for n in lengths]
        table = pa.table({"id": ids, "tokens": pa.array(tokens, type=pa.list_(pa.int32()))})
        pq.write_table(table, root / f"part-{f:03d}.parquet", row_group_size=row_group)
        docs.update({i: t.tolist() for i, t in zip(ids, tokens)})
    return docs


def write_jsonl(path: Path, records: list[dict | str]) -> None:
    """One JSON object (or a raw line, when given a str) per line."""
    with open(path, "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write((rec if isinstance(rec, str) else json.dumps(rec)) + "\n")


def bos_tokenizer(path: Path, texts: list[str], bos: str = "<s>", eos: str = "</s>") -> Path:
    """A small byte-level BPE tokenizer.json whose template puts ``bos`` before every text (as Llama's
    do), with ``eos`` as its end-of-document token; ids 0..2 are [UNK], bos, eos."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["[UNK]", bos, eos],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, 1)])
    tok.save(str(path))
    return path


def write_masked(root: Path, n_files: int = 3, docs_per_file: int = 300, median: float = 60, sigma: float = 1.4,
                 seed: int = 0, vocab: tuple[int, int] = (3, 400)) -> dict[str, tuple[list[int], list[int]]]:
    """Parquet files with columns id, tokens (list<int32>), loss_mask (a prompt-like run of 0s, then 1s with a
    few 0s among them; list<int8> in even files, list<bool> in odd ones); returns {id: (tokens, mask)}."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    docs: dict[str, tuple[list[int], list[int]]] = {}
    for f in range(n_files):
        lengths = lognormal_lengths(docs_per_file, median, sigma, rng)
        ids = [f"m{f}-{i}" for i in range(docs_per_file)]
        tokens = [rng.integers(vocab[0], vocab[1], n, dtype=np.int32) for n in lengths]
        masks = []
        for n in lengths:
            mask = (rng.random(n) > 0.1).astype(np.int8)
            mask[: int(rng.integers(0, n + 1))] = 0
            masks.append(mask)
        mask_type = pa.list_(pa.int8()) if f % 2 == 0 else pa.list_(pa.bool_())
        table = pa.table({"id": ids, "tokens": pa.array(tokens, type=pa.list_(pa.int32())),
                          "loss_mask": pa.array([m.astype(bool) if f % 2 else m for m in masks], type=mask_type)})
        pq.write_table(table, root / f"part-{f:03d}.parquet", row_group_size=100)
        docs.update({i: (t.tolist(), m.tolist()) for i, t, m in zip(ids, tokens, masks)})
    return docs


#: The split regexes of the BPE tokenizers people train with, as their tokenizer.json files give them.
QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"""
               r"""\s+(?!\S)|\s+""")
TEKKEN_SPLIT = (r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"""
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}|"""
                r""" ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+""")


def _split_then_bytes(regex: str) -> dict:
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}


#: Tokenizer shapes beside Llama 3's, each as its family's tokenizer.json has it (normalizer, pre-tokenizer,
#: the BPE model's settings), built here on cl100k_base's ranks: (normalizer, pre-tokenizer, model settings).
SHAPES = {
    "qwen2": ({"type": "NFC"}, _split_then_bytes(QWEN2_SPLIT),
              {"continuing_subword_prefix": "", "end_of_word_suffix": "", "ignore_merges": False}),
    "gpt-neox": ({"type": "NFC"}, {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                   "use_regex": True}, {"ignore_merges": False}),
    "tekken": (None, _split_then_bytes(TEKKEN_SPLIT), {"ignore_merges": True}),
    "llama3-nfkc": ({"type": "NFKC"}, None, {}),
}


def shaped_tokenizer(path: Path, shape: str) -> Path:
    """A tokenizer.json of one of :data:`SHAPES` (cl100k_base's vocabulary and merges)."""
    data = json.loads(llama3_style_tokenizer(path).read_text())
    normalizer, pre_tokenizer, model = SHAPES[shape]
    data["normalizer"] = normalizer
    if pre_tokenizer is not None:
        data["pre_tokenizer"] = pre_tokenizer
    data["model"].update(model)
    path.write_text(json.dumps(data))
    return path


def llama3_style_tokenizer(path: Path) -> Path:
    """A tokenizer.json shaped as Llama 3's (split regex, then byte-level BPE that skips merges for whole
    tokens), with cl100k_base's ranks as vocabulary: transformers' own converter, offline; ids 100256 and
    100257 are <|begin_of_text|> and <|end_of_text|>."""
    import tiktoken_ext
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = Path(tiktoken_ext.__path__[0]) / "data" / "cl100k_base.tiktoken"
    converter = TikTokenConverter(vocab_file=str(ranks), extra_special_tokens=["<|begin_of_text|>", "<|end_of_text|>"])
    converter.converted().save(str(path))
    return path
