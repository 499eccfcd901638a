"""The ``sequences`` table as its readers see it: the files of one Delta snapshot, their row
counts (from the Delta log, no file opened), and what every reader must know to use the
tokens: the sequence length, the tokenizer and its EOS id, and the pad id.

Only files in the snapshot are read, never an orphan a killed run left; and the version is
pinned, so every rank of a training job reads the same sequences even while a new run appends.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow as pa

from bfpack_spark.config import recorded_append_eos, recorded_loss_masks
from bfpack_spark.io.store.fs import join
from bfpack_spark.io.tables.read import DeltaError, output_table, table_dataset


@dataclass(frozen=True)
class TableFile:
    uri: str
    rows: int
    run_id: str
    first_seq_id: int


@dataclass(frozen=True)
class SequencesSnapshot:
    """One version of an output root's ``sequences`` table, optionally one run of it."""

    root: str
    version: int
    files: tuple[TableFile, ...]
    seq_len: int
    tokenizer: str
    eos_id: int | None
    pad_id: int
    run_ids: tuple[str, ...]
    bos_id: int | None = None    # put before every document (None: no BOS)
    loss_masks: bool = False     # the sequences carry loss masks
    append_eos: bool = False     # every document ends with eos_id
    vocab_size: int = 0          # ids of the tokenizer: 0 .. vocab_size - 1
    tokens: int = 0              # tokens of the runs' sequences, as their stats rows count them
    sequences: int = 0           # their sequences, as the stats rows count them

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)


def _runs(root: str) -> dict[str, dict]:
    """Each committed run's settings, from the ``stats`` table (one small row per run)."""
    stats = table_dataset(output_table(join(root, "stats")))
    rows = stats.to_table(columns=["run_id", "seq_len", "config", "tokens", "sequences"]).to_pylist()
    return {r["run_id"]: {"seq_len": r["seq_len"], "counted": (r["tokens"], r["sequences"]), **json.loads(r["config"])}
            for r in rows}


def _tokenizer(config: dict):
    from bfpack_spark.tokenize import load_tokenizer

    tok = config["tokenizer"]
    return load_tokenizer(tok["tokenizer"], tok.get("eos_token"), tok.get("bos_token"))


def open_sequences(root: str, run_id: str | None = None, version: int | None = None,
                   pad_id: int | None = None) -> SequencesSnapshot:
    """The snapshot of ``<root>/sequences`` at ``version`` (default: the latest), for ``run_id`` (default: all).

    ``pad_id`` defaults to the EOS id of the tokenizer the runs used when they tokenized
    text or appended EOS, else 0. Runs with different sequence lengths or tokenizers cannot
    be read as one: pick one with ``run_id``.
    """
    table = output_table(join(root, "sequences"), version)
    actions = pa.table(table.get_add_actions(flatten=True)).to_pylist()
    base = table.table_uri.rstrip("/")
    files = []
    for a in actions:
        if a.get("min.run_id") != a.get("max.run_id") or a.get("min.run_id") is None:
            raise DeltaError(f"{a['path']} holds rows of several runs (or no statistics); "
                             "it was not written by bfpack")
        if run_id is None or a["min.run_id"] == run_id:
            files.append(TableFile(f"{base}/{a['path']}", int(a["num_records"]), a["min.run_id"],
                                   int(a["min.seq_id"])))
    if not files:
        raise DeltaError(f"{root}/sequences has no sequence" + (f" of run {run_id}" if run_id else ""))
    # a canonical order, whatever the log's: by run, then by the ids each file starts at
    files.sort(key=lambda f: (f.run_id, f.first_seq_id, f.uri))
    runs = _runs(root)
    run_ids = tuple(sorted({f.run_id for f in files}))
    missing = [r for r in run_ids if r not in runs]
    if missing:
        raise DeltaError(f"run {missing[0]} is in {root}/sequences but not in its stats table")
    settings = {(runs[r]["seq_len"], runs[r]["tokenizer"]["tokenizer"], runs[r]["tokenizer"].get("eos_token"),
                 runs[r]["tokenizer"].get("bos_token"), runs[r]["tokenizer"].get("prepend_bos"),
                 recorded_append_eos(runs[r]), recorded_loss_masks(runs[r])) for r in run_ids}
    if len(settings) > 1:
        raise DeltaError(f"{root}/sequences holds runs with different sequence lengths, tokenizers, BOS, EOS or "
                         f"loss-mask settings ({sorted(settings, key=str)}); read one run at a time (run_id=...)")
    config = runs[run_ids[0]]
    tokenizer = _tokenizer(config)
    eos, append_eos = tokenizer.eos_id, recorded_append_eos(config)
    uses_tokenizer = config["input"].get("token_column") is None or append_eos
    if pad_id is None:
        pad_id = eos if uses_tokenizer and eos is not None else 0
    from bfpack_spark.tokenize import document_bos

    return SequencesSnapshot(root=root, version=table.version(), files=tuple(files), seq_len=config["seq_len"],
                             tokenizer=config["tokenizer"]["tokenizer"], eos_id=eos, pad_id=pad_id,
                             run_ids=run_ids, bos_id=document_bos(tokenizer, config["tokenizer"].get("prepend_bos")),
                             loss_masks=recorded_loss_masks(config), append_eos=bool(append_eos),
                             vocab_size=int(tokenizer.known_ids.shape[0]),
                             tokens=sum(runs[r]["counted"][0] for r in run_ids),
                             sequences=sum(runs[r]["counted"][1] for r in run_ids))
