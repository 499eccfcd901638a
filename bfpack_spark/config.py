"""The one configuration model: YAML file, then command-line overrides, validated up front.

Every field of :class:`PackConfig` lives in a YAML section (``input``, ``tokenizer``,
``packing``, ``output``, ``quality``, ``spark``) and has a command-line flag of the
same name with dashes (``packing.seq_len`` is ``--seq-len``). :func:`load_config`
merges them and :meth:`PackConfig.validate` checks everything that can be checked
before Spark starts, raising :class:`ConfigError` with one line that names the field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from bfpack_spark.constants import DEFAULT_ID_COLUMN, DEFAULT_TOKENIZER, MAX_SEQ_LEN, PYTHON_STDLIB, redacted

#: Set (to anything but "" or "0") by ``bfpack --debug``: JVM warnings reach the console too.
DEBUG_ENV = "BFPACK_DEBUG"


class ConfigError(ValueError):
    """A configuration value is missing or wrong; the message names the field."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class InputConfig:
    paths: list[str] = _f([], "input files, directories or globs (local paths or s3://...); "
                              "repeat --input or separate with commas; 'python-stdlib' is this "
                              "Python's standard-library sources", flag="input")
    format: Literal["auto", "jsonl", "parquet", "delta", "text"] = _f(
        "auto", "input format; auto: from the extension (.jsonl/.json[.gz|.zst], .parquet) or a "
                "_delta_log directory; text: every file is one document", flag="input-format")
    id_column: str | None = _f(DEFAULT_ID_COLUMN, "column (or JSON field) holding the document id; when the corpus "
                                     "has none, ids are derived from source file and row")
    text_column: str = _f("text", "column holding the raw text to tokenize")
    token_column: str | None = _f(None, "column holding already tokenized documents (list of int); "
                                        "when set, tokenization is skipped")
    loss_mask_column: str | None = _f(None, "tokenized input: column holding each document's loss mask, a list "
                                            "of 0/1 (int or bool) as long as its tokens; 0: never a training "
                                            "target. Wrong length or values: a reject (bad_loss_mask)")
    prompt_column: str | None = _f(None, "text input: column holding a prompt; the document is the prompt's "
                                         "tokens, then the text's, and only the text's tokens are targets "
                                         "(loss mask 0 on the prompt)")
    target_items_per_partition: int = _f(100_000, "input groups (one read task and one packing "
                                                  "partition each) hold about this many items "
                                                  "(chunks of at most seq_len tokens)")
    min_partitions: int = _f(4, "cut the input into at least this many groups where files allow")


@dataclass
class TokenizerConfig:
    tokenizer: str = _f(DEFAULT_TOKENIZER, "tiktoken encoding name, path to a .tiktoken file, or path "
                                           "to a Hugging Face tokenizer.json")
    append_eos: bool | None = _f(None, "append the end-of-document token to every document "
                                       "(default: yes for text, no for already tokenized input)")
    eos_token: str | None = _f(None, "end-of-document token (default: the tokenizer's own, "
                                     "<|endoftext|> for cl100k_base)")
    bos_token: str | None = _f(None, "beginning-of-document token, a special token of the tokenizer, put before "
                                     "every document's first token (never before the continuation chunks of a "
                                     "long document). Default: the BOS a tokenizer.json's template adds "
                                     "(<|begin_of_text|>, <s>, ...); none for tiktoken encodings")
    prepend_bos: bool | None = _f(None, "put the BOS token before every document (default: yes when bos_token is "
                                        "set or the tokenizer.json's template adds one); --no-prepend-bos: never")
    engine: Literal["auto", "reference"] = _f(
        "auto", "what encodes text: auto: gigatoken where its ids are proven equal to the reference's (cl100k_base "
                "and tested tokenizer.json structures), the reference elsewhere; reference: always tiktoken or HF "
                "tokenizers. The ids are the same either way", flag="tokenizer-engine")


@dataclass
class PackingConfig:
    seq_len: int = _f(2048, "L: the sequence length (context size) to pack into; 1 to 16,777,216")
    strategy: Literal["bfd", "concat"] = _f("bfd", "bfd: best-fit packing; concat: the concatenate-"
                                                    "and-cut baseline (for comparison)")
    partitions: int | None = _f(None, "number of packing partitions (default: one per input group; one, which is "
                                      "one-process BFD, when every chunk fits one task of merge_items_per_partition)")
    residual_fill: float = _f(0.99, "sequences of a partition filled below this fraction of seq_len "
                                    "are re-packed in the residual merge")
    merge_items_per_partition: int = _f(200_000, "at most this many items per task of a residual "
                                                 "merge round, and moved segments per task of the "
                                                 "final reduce")
    length_buckets: int = _f(256, "packing partitions get an equal share of each of this many length "
                                  "buckets (linear over 1..seq_len); more: tighter on length-sorted "
                                  "input, more tokens move")
    max_segments_per_sequence: int | None = _f(None, "no sequence holds more segments (documents or chunks) "
                                                     "than this (default: no cap); per-document attention "
                                                     "kernels cost per segment")


@dataclass
class OutputConfig:
    output: str = _f("", "output root; holds the Delta tables sequences, documents, rejects, inputs, stats")
    mode: Literal["overwrite", "append", "incremental"] | None = _f(
        None, "overwrite: rebuild the tables; append: add this run (a new shard) to them; incremental: pack only "
              "the input files no earlier run packed, as a new run. Not given: build the tables in a root that "
              "holds none, never replace another run's (the same command again does nothing)")
    repack_changed: bool = _f(False, "incremental: an input file changed since it was packed re-packs "
                                     "the run that packed it (all that run's files), replacing its rows; "
                                     "without it, a changed file is an error")
    storage_options: dict[str, str] = _f({}, "object-store settings for every read and write, pyarrow's and "
                                             "deltalake's (delta-rs names: AWS_ENDPOINT_URL, AWS_REGION, "
                                             "AWS_ALLOW_HTTP, ...); secrets are never logged or stored",
                                         flag="storage-option")
    run_id: str | None = _f(None, "run id stored in every row (default: derived from input and "
                                  "config, so rerunning the same command is idempotent)")
    work_dir: str | None = _f(None, "scratch space for tokens between the read and the assembly, visible "
                                    "to every executor (default: _bfpack_work under the output root)")
    resume: bool = _f(True, "a run stopped before it committed (its driver lost: killed, out of memory, a second YARN "
                            "attempt) is resumed by the same command: the work its tasks finished is checked and "
                            "reused; --no-resume starts afresh")
    delta_writer: Literal["auto", "delta-spark", "deltalake"] = _f(
        "auto", "how Delta commits are made: delta-spark when its JVM connector is on the "
                "classpath, else the deltalake package")
    retry_attempts: int = _f(20, "object stores: attempts at one request the store throttled (503 SlowDown, 429) "
                                 "or whose connection dropped, with exponential backoff and jitter (Hadoop S3A: "
                                 "20); a wrong endpoint, bucket or credentials is never retried")
    retry_seconds: float = _f(180.0, "object stores: no retry of a request starts later than this many seconds "
                                     "after its first attempt (delta-rs: 3 minutes); also delta-rs's retry_timeout")


@dataclass
class QualityConfig:
    empty_documents: Literal["skip", "keep"] = _f(
        "skip", "skip: empty documents go to rejects; keep: packed (as the end-of-document token)")
    duplicate_ids: Literal["skip", "keep"] = _f(
        "skip", "skip: later documents with an already seen id (in this run, or packed by an earlier run "
                "of the output root) go to rejects; keep: pack them all")
    max_reject_fraction: float = _f(0.2, "fail the run (before committing) when more than this "
                                         "fraction of input documents is rejected")
    max_document_bytes: int = _f(256 * 2**20, "reject documents whose text is larger than this many "
                                               "bytes of UTF-8")
    max_line_bytes: int = _f(2**30, "reject JSON lines longer than this before parsing them (a memory "
                                    "guard of the reader; JSON escapes make a line longer than its text)")


@dataclass
class SparkConfig:
    master: str | None = _f(None, "Spark master (default: local[*,F] outside spark-submit, F = task_attempts)")
    task_attempts: int = _f(4, "local mode: attempts of each Spark task, so one transient failure does not end "
                               "the run (the F of local[N,F]); on a cluster, Spark's spark.task.maxFailures "
                               "(bfpack's default: 4)")
    app_name: str = _f("bfpack", "Spark application name")
    progress_seconds: float = _f(30.0, "when stderr is not a terminal (spark-submit, a scheduler, a log file): a "
                                       "progress line per stage this often (tasks done, documents, tokens, MB/s, "
                                       "ETA); 0: none. On a terminal, a progress bar")
    conf: dict[str, str] = _f({}, "extra Spark settings; on the command line --spark-conf key=value",
                              flag="spark-conf")


SECTIONS: dict[str, type] = {
    "input": InputConfig, "tokenizer": TokenizerConfig, "packing": PackingConfig,
    "output": OutputConfig, "quality": QualityConfig, "spark": SparkConfig,
}


@dataclass
class PackConfig:
    input: InputConfig = field(default_factory=InputConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    packing: PackingConfig = field(default_factory=PackingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    spark: SparkConfig = field(default_factory=SparkConfig)

    def to_dict(self) -> dict[str, Any]:
        """The settings, with secret storage options masked (this is what logs and ``stats`` keep)."""
        d = dataclasses.asdict(self)
        d["output"]["storage_options"] = redacted(d["output"]["storage_options"])
        return d

    def fingerprint(self) -> str:
        """A hash of the settings that decide the tables' contents: not where the input is
        (the input files' own fingerprints stand for it), not where or how output is written, not
        which tokenizer engine encodes."""
        d = self.to_dict()
        d.pop("spark")
        d["output"] = {}
        d["input"].pop("paths")
        d["tokenizer"].pop("engine")  # the engines' ids are the same
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()

    @property
    def tokenized(self) -> bool:
        return self.input.token_column is not None

    @property
    def extra_column(self) -> str | None:
        """The column beside the tokens or text: a loss mask, or a prompt."""
        return self.input.loss_mask_column if self.tokenized else self.input.prompt_column

    @property
    def loss_masks(self) -> bool:
        """Whether the run carries per-token loss masks (a mask column, or prompts)."""
        return self.input.loss_mask_column is not None or self.input.prompt_column is not None

    @property
    def append_eos(self) -> bool:
        """The EOS setting in effect: explicit, or on for text and off for given token ids."""
        if self.tokenizer.append_eos is None:
            return not self.tokenized
        return self.tokenizer.append_eos

    def validate(self) -> PackConfig:
        """Check every value that can be checked without Spark; raise ConfigError naming the field."""
        for section, cls in SECTIONS.items():
            obj = getattr(self, section)
            hints = get_type_hints(cls)
            for f in fields(cls):
                _check_type(f"{section}.{f.name}", getattr(obj, f.name), hints[f.name])
        if not self.input.paths:
            raise ConfigError("input.paths: no input given (--input PATH)")
        if not self.output.output:
            raise ConfigError("output.output: no output root given (--output PATH)")
        p, q = self.packing, self.quality
        _positive("packing.seq_len", p.seq_len)
        if p.seq_len > MAX_SEQ_LEN:
            raise ConfigError(f"packing.seq_len: at most {MAX_SEQ_LEN:,} tokens (a sequence must fit the "
                              f"assembly's 64 MB slices of int32 tokens), got {p.seq_len:,}")
        if p.length_buckets > 2**16:
            raise ConfigError(f"packing.length_buckets: at most {2**16}, got {p.length_buckets}")
        for name in ("max_document_bytes", "max_line_bytes"):
            if getattr(q, name) >= 2**31:
                raise ConfigError(f"quality.{name}: below 2 GiB (Arrow's 32-bit string offsets), "
                                  f"got {getattr(q, name):,}")
        _inside("output.output", self.output.output, "input", self.input.paths)
        _positive("input.target_items_per_partition", self.input.target_items_per_partition)
        _positive("input.min_partitions", self.input.min_partitions)
        _positive("packing.merge_items_per_partition", p.merge_items_per_partition)
        _positive("packing.length_buckets", p.length_buckets)
        if p.partitions is not None:
            _positive("packing.partitions", p.partitions)
        if not 0.0 <= p.residual_fill <= 1.0:
            raise ConfigError(f"packing.residual_fill: must be within [0, 1], got {p.residual_fill}")
        if not 0.0 <= q.max_reject_fraction <= 1.0:
            raise ConfigError(f"quality.max_reject_fraction: must be within [0, 1], got {q.max_reject_fraction}")
        _positive("quality.max_document_bytes", q.max_document_bytes)
        _positive("output.retry_attempts", self.output.retry_attempts)
        _positive("spark.task_attempts", self.spark.task_attempts)
        if self.spark.progress_seconds < 0:
            raise ConfigError(f"spark.progress_seconds: 0 (none) or more, got {self.spark.progress_seconds}")
        if not self.output.retry_seconds > 0:
            raise ConfigError(f"output.retry_seconds: must be above 0, got {self.output.retry_seconds}")
        _positive("quality.max_line_bytes", q.max_line_bytes)
        if self.input.format == "text" and self.tokenized:
            raise ConfigError("input.token_column: text files hold text; drop --token-column or "
                              "choose another --input-format")
        if self.input.loss_mask_column is not None and not self.tokenized:
            raise ConfigError("input.loss_mask_column: loss masks come with tokenized input (--token-column); "
                              "for text, give the prompt with --prompt-column")
        if self.input.prompt_column is not None and (self.tokenized or self.input.format == "text"):
            raise ConfigError("input.prompt_column: prompts are text in JSON lines or Parquet; for tokenized "
                              "input give a --loss-mask-column")
        if p.max_segments_per_sequence is not None:
            _positive("packing.max_segments_per_sequence", p.max_segments_per_sequence)
            if p.strategy != "bfd":
                raise ConfigError("packing.max_segments_per_sequence: the cap applies to best-fit packing; "
                                  "the concat baseline cuts one stream and has none")
        if q.empty_documents == "keep" and not self.append_eos:
            raise ConfigError("quality.empty_documents: 'keep' packs an empty document as its "
                              "end-of-document token, so it needs tokenizer.append_eos: true")
        master = self.spark.master
        if master is not None and not re.fullmatch(
                r"local(\[(\*|\d+)(,\d+)?\])?|local-cluster\[\d+, *\d+, *\d+\]|yarn|(spark|k8s|mesos)://\S+",
                master):
            raise ConfigError(f"spark.master: {master!r} is not a master URL (local[N], local-cluster[N,C,M], "
                              f"yarn, spark://host:port, k8s://...)")
        if self.output.run_id is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}",
                                                               self.output.run_id):
            raise ConfigError(f"output.run_id: {self.output.run_id!r} must be 1-100 letters, digits, "
                              f"'.', '_' or '-', starting with a letter or digit")
        return self


def _inside(name: str, output: str, other: str, paths: list[str]) -> None:
    """Refuse an output root inside an input path, or an input inside the output root: a rerun
    would read its own tables."""
    def norm(p: str) -> str:
        p = p.removeprefix("file://")
        return p.rstrip("/") if "://" in p else os.path.abspath(p)

    out = norm(output)
    for path in paths:
        if "*" in path or path == PYTHON_STDLIB:
            continue
        src = norm(path)
        if out == src or out.startswith(src + "/") or src.startswith(out + "/"):
            raise ConfigError(f"{name}: the output root {output!r} and the {other} {path!r} overlap; a later "
                              f"run would read its own tables: put the output elsewhere")


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"{name}: must be at least 1, got {value}")


def _check_type(name: str, value: Any, hint: Any) -> None:
    origin, args = get_origin(hint), get_args(hint)
    if origin is not Literal and type(None) in args:  # Optional
        if value is None:
            return
        hint = next(a for a in args if a is not type(None))
        origin, args = get_origin(hint), get_args(hint)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{name}: {value!r} is not one of {', '.join(map(str, args))}")
    elif origin is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{name}: expected a list of strings, got {value!r}")
    elif origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
    elif hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true or false, got {value!r}")
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
    elif hint is str and not isinstance(value, str):
        raise ConfigError(f"{name}: expected a string, got {value!r}")


def field_specs() -> list[tuple[str, str, dataclasses.Field, Any]]:
    """(section, flag, field, type hint) for every configurable field, in declaration order."""
    specs = []
    for section, cls in SECTIONS.items():
        hints = get_type_hints(cls)
        for f in fields(cls):
            flag = f.metadata.get("flag", f.name.replace("_", "-"))
            specs.append((section, flag, f, hints[f.name]))
    return specs


def load_config(path: str | None = None, overrides: dict[str, Any] | None = None) -> PackConfig:
    """Defaults, then the YAML file at ``path``, then ``overrides`` ({"section.field": value}).

    YAML is read with ``yaml.safe_load``: no tags, no object construction.
    """
    data: dict[str, Any] = {}
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"--config: no such file {path!r}")
        try:
            with open(path, encoding="utf-8") as fh:
                data = yaml.safe_load(fh) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"--config: {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"--config: {path} must hold a mapping of sections")
    sections: dict[str, Any] = {}
    for section, cls in SECTIONS.items():
        values = data.pop(section, None) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{section}: expected a mapping, got {values!r}")
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ConfigError(f"{section}.{sorted(unknown)[0]}: unknown setting; known: {', '.join(sorted(known))}")
        sections[section] = cls(**values)
    if data:
        raise ConfigError(f"{sorted(data)[0]}: unknown section; known: {', '.join(SECTIONS)}")
    config = PackConfig(**sections)
    for key, value in (overrides or {}).items():
        section, name = key.split(".", 1)
        setattr(getattr(config, section), name, value)
    if isinstance(config.input.paths, str):
        config.input.paths = [config.input.paths]
    for section, _, f, hint in field_specs():  # 1 and 1.0 are the same setting (and fingerprint)
        obj = getattr(config, section)
        value = getattr(obj, f.name)
        if float in (hint, *get_args(hint)) and isinstance(value, int) and not isinstance(value, bool):
            setattr(obj, f.name, float(value))
    return config


def recorded_append_eos(settings: dict) -> bool:
    """Whether a run appended EOS, from the settings its ``stats`` row records (``to_dict()``)."""
    explicit = settings["tokenizer"].get("append_eos")
    return explicit if explicit is not None else settings["input"].get("token_column") is None


def recorded_loss_masks(settings: dict) -> bool:
    """Whether a run's sequences carry loss masks, from its recorded settings (runs older than masks
    record neither column)."""
    return settings["input"].get("loss_mask_column") is not None or settings["input"].get("prompt_column") is not None


def default_run_id(config: PackConfig, input_listing: Iterable[tuple[str, int, str]]) -> str:
    """``run-<hash>`` of the config's fingerprint and the input files (name, size, and version: the ETag, or
    the modification time, as listed): the same files, however their location is spelled, with the same
    settings, are the same run."""
    h = hashlib.sha256(config.fingerprint().encode())
    for name, size, digest in input_listing:
        h.update(f"{name}\0{size}\0{digest}\n".encode())
    return "run-" + h.hexdigest()[:16]
