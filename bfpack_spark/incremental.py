"""What an output root already holds, for runs that add to it: whether their settings agree,
and (scheduled rebuilds of a growing corpus) which input files were packed.

Every run records its input files in the ``inputs`` table (uri, size, and a digest of the
file's first and last 64 KiB). ``--mode incremental`` packs only the files no committed run
recorded, as a new run appended to every table (with ``--repack-changed``, also the runs whose
files changed since, replacing their rows). A file is packed when the run that recorded
it committed its ``stats`` row (the last commit of a run): a run that crashed before that
recorded nothing, so its rerun picks the same new files, gets the same run id, and adds its
rows once, as ``append`` does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.dataset as ds

from bfpack_spark.config import recorded_append_eos, recorded_loss_masks
from bfpack_spark.io.delta import snapshot_dataset
from bfpack_spark.io.files import InputError, InputFile, join


@dataclass(frozen=True)
class PackedFile:
    size: int
    digest: str
    run_id: str


def committed_runs(root: str) -> set[str]:
    """The runs with a ``stats`` row (their last commit) under ``root``."""
    stats = snapshot_dataset(join(root, "stats"))
    return set() if stats is None else set(stats.to_table(columns=["run_id"]).column(0).to_pylist())


def _committed_inputs(root: str, required: bool = True) -> tuple[set[str], list[dict]]:
    """The committed runs under ``root``, and their ``inputs`` rows (``required``: an error where
    the runs did not record them)."""
    committed = committed_runs(root)
    if not committed:
        return set(), []
    inputs = snapshot_dataset(join(root, "inputs"))
    if inputs is None:
        if required:
            raise InputError(f"{root} was written by a bfpack version that did not record its input files; "
                             "rebuild it once with --mode overwrite, then run --mode incremental")
        return committed, []
    rows = inputs.to_table(filter=ds.field("run_id").isin(pa.array(sorted(committed), pa.string()))).to_pylist()
    return committed, rows


def packed_files(root: str) -> dict[str, PackedFile]:
    """The input files of every committed run under ``root`` that no later run replaced, by uri."""
    _, rows = _committed_inputs(root)
    replaced = {r.get("replaces") for r in rows}
    return {r["uri"]: PackedFile(r["size"], r["digest"], r["run_id"]) for r in rows if r["run_id"] not in replaced}


def unfinished_replacements(root: str) -> dict[str, str]:
    """Runs replaced by a committed run whose rows are not all removed yet: {old run: new run}.

    A replaced run's ``stats`` row goes last, so while it is there the removal is unfinished
    (a run stopped between its own commits and the removal); the next run finishes it.
    """
    committed, rows = _committed_inputs(root, required=False)
    return {r["replaces"]: r["run_id"] for r in rows if r.get("replaces") in committed}


def select_files(listed: list[tuple[InputFile, str]], packed: dict[str, PackedFile],
                 repack_changed: bool = False) -> tuple[list[InputFile], dict[str, str]]:
    """The listed files (with their digests) an incremental run packs, and the re-packed ones' runs.

    New files are packed. A file packed before that has changed since is an error: its rows
    are in the tables, and packing it again would add its documents twice. With
    ``repack_changed``, the run that packed it is re-packed instead: its sequences mix the
    documents of all its files, so all of them are packed again (as they are now) and that
    run's rows are replaced. Returns (files, {uri: run replaced}).
    """
    changed = {}
    for f, digest in listed:
        old = packed.get(f.uri)
        if old is not None and (old.size, old.digest) != (f.size, digest):
            if not repack_changed:
                raise InputError(f"{f.uri} changed after run {old.run_id} packed it (size {old.size:,} -> "
                                 f"{f.size:,}); re-pack it (and the rest of its run) with --repack-changed, "
                                 "or rebuild with --mode overwrite")
            changed[f.uri] = old.run_id
    runs = set(changed.values())
    replaces = {uri: p.run_id for uri, p in packed.items() if p.run_id in runs}
    listed_uris = {f.uri for f, _ in listed}
    gone = sorted(uri for uri in replaces if uri not in listed_uris)
    if gone:
        raise InputError(f"re-packing run {replaces[gone[0]]} needs all its files, but {gone[0]} is no longer "
                         "in the input; restore it, or rebuild with --mode overwrite")
    return [f for f, _ in listed if f.uri not in packed or f.uri in replaces], replaces


#: Settings every run appended to one output root must share: the tables' sequences must be alike.
SHARED = {"packing.seq_len": ("packing", "seq_len"), "packing.strategy": ("packing", "strategy"),
          "packing.max_segments_per_sequence": ("packing", "max_segments_per_sequence"),
          "tokenizer.tokenizer": ("tokenizer", "tokenizer"), "tokenizer.eos_token": ("tokenizer", "eos_token"),
          "tokenizer.bos_token": ("tokenizer", "bos_token"), "tokenizer.prepend_bos": ("tokenizer", "prepend_bos")}




def check_compatible(root: str, config: dict) -> None:
    """Refuse to add a run whose packing settings differ from the runs already in ``root``."""
    stats = snapshot_dataset(join(root, "stats"))
    if stats is None:
        return
    for row in stats.to_table(columns=["run_id", "config"]).to_pylist():
        if not row["config"]:  # a row without its settings (not written by bfpack) binds nothing
            continue
        theirs = json.loads(row["config"])
        differ = [f"{name} {theirs[a].get(b)!r} (theirs) != {config[a][b]!r}" for name, (a, b) in SHARED.items()
                  if theirs[a].get(b) != config[a].get(b)]
        if recorded_append_eos(theirs) != recorded_append_eos(config):
            differ.append(f"tokenizer.append_eos {recorded_append_eos(theirs)} (theirs) != "
                          f"{recorded_append_eos(config)}")
        if recorded_loss_masks(theirs) != recorded_loss_masks(config):
            differ.append(f"loss masks {recorded_loss_masks(theirs)} (theirs) != {recorded_loss_masks(config)} "
                          "(input.loss_mask_column / input.prompt_column)")
        if differ:
            raise InputError(f"{root} holds run {row['run_id']} packed with other settings: {'; '.join(differ)}; "
                             "use the same settings, --mode overwrite, or another output root")
