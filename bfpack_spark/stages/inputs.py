"""Stage 0, inputs: everything that can go wrong before Spark starts, then the read's groups.

The tokenizer's special tokens, the output root (writable; for a run that adds to it, packed with
the same settings), the input files (listed, never opened; for an incremental run, only those no
committed run packed: :mod:`bfpack_spark.incremental`), the first file's columns, and the groups
the read tasks read (:mod:`bfpack_spark.io.listing.plan`). A mistake found here is one line.
"""

from __future__ import annotations

import pyarrow as pa

from bfpack_spark.config import PackConfig
from bfpack_spark.constants import DEFAULT_ID_COLUMN
from bfpack_spark.incremental import check_compatible, packed_files, select_files
from bfpack_spark.io.listing.listing import list_inputs
from bfpack_spark.io.listing.plan import InputPlan, check_columns, plan_groups
from bfpack_spark.io.store.fs import check_writable
from bfpack_spark.schemas import INPUTS, modified
from bfpack_spark.tokenize import TokenizerError, document_bos, load_tokenizer


def _check_tokenizer(config: PackConfig) -> None:
    t = config.tokenizer  # loaded as the run will (cached): the engine line takes the same one
    tokenizer = load_tokenizer(t.tokenizer, t.eos_token, t.bos_token, t.engine)
    if config.append_eos and tokenizer.eos_id is None:
        raise TokenizerError(f"{tokenizer.name} has no end-of-document token; name one with --eos-token "
                             f"or turn it off with --no-append-eos")
    document_bos(tokenizer, config.tokenizer.prepend_bos)


#: Tokens per second per core of each engine (``python benchmarks/bench_engines.py``, BENCHMARKS.md "Each
#: tokenizer engine, per core"; medians over the shapes): what the run announces it will cost before any work.
ENGINE_RATES = {"gigatoken": 20e6, "tiktoken": 3.0e6, "tokenizers": 0.4e6}


def engine_line(config: PackConfig) -> str:
    """One line, said before any work: the tokenizer, the engine that will encode its text and at what rough
    cost, and, when it is the reference, why and how much faster the fast engine would be."""
    t = config.tokenizer
    tokenizer = load_tokenizer(t.tokenizer, t.eos_token, t.bos_token, t.engine)
    package = tokenizer.engine.split()[0]
    rate = f"about {ENGINE_RATES.get(package, 0) / 1e6:.1f}M tokens/s per core"
    if tokenizer.fast is not None:
        return f"tokenizer {tokenizer.name}: the fast engine ({tokenizer.engine}) encodes, {rate}; ids proven equal"
    fast = ENGINE_RATES["gigatoken"] / ENGINE_RATES.get(package, ENGINE_RATES["gigatoken"])
    return (f"tokenizer {tokenizer.name}: the reference engine ({tokenizer.engine}) encodes, {rate} (the fast "
            f"engine: {fast:.0f}x that); why: {tokenizer.why_reference}; see docs/guide/tokenizers.md, 'The engine'")


def plan_inputs(config: PackConfig) -> InputPlan:
    """The run's input files and groups (no group for an incremental run with nothing new)."""
    _check_tokenizer(config)
    root = config.output.output
    check_writable(root)
    if config.output.mode in ("append", "incremental"):
        check_compatible(root, config.to_dict())
    listing = list_inputs(config.input.paths, config.input.format)
    payload = config.input.token_column or config.input.text_column
    named = {}
    if config.input.id_column not in (None, "", DEFAULT_ID_COLUMN):
        named[config.input.id_column] = "--id-column"
    if extra := config.extra_column:
        named[extra] = "--loss-mask-column" if config.tokenized else "--prompt-column"
    replaces: dict[str, str] = {}
    if config.output.mode == "incremental":  # the files no committed run packed: none of the others is read
        selection = select_files(listing, packed_files(root), config.output.repack_changed)
        listing, replaces = selection.files, selection.replaces
        if not len(listing):
            return InputPlan(listing)
    check_columns(listing, payload, config.tokenized, named)
    plan = plan_groups(listing, payload, tokenized=config.tokenized, seq_len=config.packing.seq_len,
                       target_items=config.input.target_items_per_partition, min_groups=config.input.min_partitions)
    plan.replaces = replaces
    return plan


def inputs_table(run_id: str, plan: InputPlan) -> pa.Table:
    """The ``inputs`` rows of a run: its files as their listing gave them (an incremental run compares them)."""
    t = plan.listing.table
    n = t.num_rows
    uris = t.column("uri").combine_chunks()
    replaces = pa.array([plan.replaces.get(u) for u in uris.to_pylist()], pa.string()) if plan.replaces \
        else pa.nulls(n, pa.string())
    return pa.table({"run_id": pa.repeat(run_id, n), "uri": uris, "source": t.column("source"),
                     "size": t.column("size"), "digest": pa.nulls(n, pa.string()), "replaces": replaces,
                     "modified": modified(t.column("modified_ns")), "etag": t.column("etag")}, schema=INPUTS)
