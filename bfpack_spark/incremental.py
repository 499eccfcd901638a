"""What an output root already holds, for runs that add to it: whether their settings agree,
and (scheduled rebuilds of a growing corpus) which input files were packed.

Every run records its input files in the ``inputs`` table as their listing gave them (uri, size,
modification time, and the ETag on S3). ``--mode incremental`` lists the input, compares it with
those rows, and packs only the files no committed run recorded (reading none of the others), as a
new run appended to every table (with ``--repack-changed``, also the runs whose files changed
since, replacing their rows). A file is packed when the run that recorded
it committed its ``stats`` row (the last commit of a run): a run that crashed before that
recorded nothing, so its rerun picks the same new files, gets the same run id, and adds its
rows once, as ``append`` does.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from bfpack_spark.config import recorded_append_eos, recorded_loss_masks
from bfpack_spark.errors import InputError
from bfpack_spark.io.listing.listing import Listing, content_digest
from bfpack_spark.io.store.fs import join
from bfpack_spark.io.tables.read import snapshot_dataset, stats_rows
from bfpack_spark.schemas import INPUTS, modified


def committed_runs(root: str) -> set[str]:
    """The runs with a ``stats`` row (their last commit) under ``root``."""
    return {r["run_id"] for r in stats_rows(root, ["run_id"])}


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


def packed_files(root: str) -> pa.Table:
    """The ``inputs`` rows of every committed run under ``root`` that no later run replaced."""
    _, rows = _committed_inputs(root)
    replaced = {r.get("replaces") for r in rows}
    kept = [r for r in rows if r["run_id"] not in replaced]
    return pa.Table.from_pylist(kept, schema=INPUTS) if kept else INPUTS.empty_table()


def unfinished_replacements(root: str) -> dict[str, str]:
    """Runs replaced by a committed run whose rows are not all removed yet: {old run: new run}.

    A replaced run's ``stats`` row goes last, so while it is there the removal is unfinished
    (a run stopped between its own commits and the removal); the next run finishes it.
    """
    committed, rows = _committed_inputs(root, required=False)
    return {r["replaces"]: r["run_id"] for r in rows if r.get("replaces") in committed}


@dataclass(frozen=True)
class Selection:
    """The listed files an incremental run packs, and the runs it re-packs ({uri: run replaced})."""

    files: Listing
    replaces: dict[str, str]


def _changed(listing: Listing, packed: pa.Table) -> dict[str, tuple[str, str]]:
    """{uri: (run that packed it, what changed)} of the listed files packed before that changed since, by
    what the listing says: the size, and the ETag where the store gives one, else the modification time.
    Rows of bfpack before 0.2 hold a digest of the file's edges instead: those files alone are read."""
    listed = listing.table.select(["uri", "size", "etag"]).append_column(
        "modified_now", modified(listing.table.column("modified_ns")))
    both = listed.join(packed.select(["uri", "size", "modified", "etag", "digest", "run_id"]), "uri",
                       join_type="inner", right_suffix="_packed")
    if not both.num_rows:
        return {}
    rows = both.to_pylist()
    changed = {}
    legacy = []
    for r in rows:
        if r["size"] != r["size_packed"]:
            changed[r["uri"]] = r["run_id"], f"size {r['size_packed']:,} -> {r['size']:,}"
        elif r["etag_packed"] is not None and r["etag"] is not None:
            if r["etag"] != r["etag_packed"]:
                changed[r["uri"]] = r["run_id"], f"ETag {r['etag_packed']} -> {r['etag']}"
        elif r["modified"] is not None:
            if r["modified_now"] != r["modified"]:
                changed[r["uri"]] = (r["run_id"], f"modified {r['modified']:%Y-%m-%d %H:%M:%S.%f} -> "
                                                  f"{r['modified_now']:%H:%M:%S.%f}")
        elif r["digest"] is not None:
            legacy.append(r)
    with ThreadPoolExecutor(16) as pool:
        digests = list(pool.map(lambda r: content_digest(r["uri"], r["size"]), legacy))
    changed.update((r["uri"], (r["run_id"], "content")) for r, d in zip(legacy, digests) if d != r["digest"])
    return changed


def select_files(listing: Listing, packed: pa.Table, repack_changed: bool = False) -> Selection:
    """The listed files an incremental run packs, and the re-packed ones' runs.

    New files are packed. A file packed before that has changed since is an error: its rows
    are in the tables, and packing it again would add its documents twice. With
    ``repack_changed``, the run that packed it is re-packed instead: its sequences mix the
    documents of all its files, so all of them are packed again (as they are now) and that
    run's rows are replaced. No file an earlier run packed is read (but for rows of bfpack before 0.2).
    """
    changed = _changed(listing, packed)
    if changed and not repack_changed:
        uri = min(changed)
        run, what = changed[uri]
        raise InputError(f"{uri} changed after run {run} packed it ({what}); re-pack it (and the rest of its run) "
                         "with --repack-changed, or rebuild with --mode overwrite")
    runs = pa.array(sorted({run for run, _ in changed.values()}), pa.string())
    again = packed.filter(pc.is_in(packed.column("run_id"), runs))
    replaces = dict(zip(again.column("uri").to_pylist(), again.column("run_id").to_pylist()))
    gone = sorted(set(replaces) - set(listing.column("uri"))) if replaces else []
    if gone:
        raise InputError(f"re-packing run {replaces[gone[0]]} needs all its files, but {gone[0]} is no longer "
                         "in the input; restore it, or rebuild with --mode overwrite")
    keep = pc.or_(pc.invert(pc.is_in(listing.table.column("uri"), packed.column("uri"))),
                  pc.is_in(listing.table.column("uri"), again.column("uri")))
    return Selection(Listing(listing.table.filter(keep)), replaces)


#: Settings every run appended to one output root must share: the tables' sequences must be alike.
SHARED = {"packing.seq_len": ("packing", "seq_len"), "packing.strategy": ("packing", "strategy"),
          "packing.max_segments_per_sequence": ("packing", "max_segments_per_sequence"),
          "tokenizer.tokenizer": ("tokenizer", "tokenizer"), "tokenizer.eos_token": ("tokenizer", "eos_token"),
          "tokenizer.bos_token": ("tokenizer", "bos_token"), "tokenizer.prepend_bos": ("tokenizer", "prepend_bos")}




def check_compatible(root: str, config: dict) -> None:
    """Refuse to add a run whose packing settings differ from the runs already in ``root``."""
    for row in stats_rows(root, ["run_id", "config"]):
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
