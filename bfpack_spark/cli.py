"""``bfpack``: the command line. It parses arguments, builds the config, and calls the library.

    bfpack pack --config conf/local.yaml [--input ...] [--output ...] [--seq-len ...]
    bfpack pack-tokenized --input tokens.parquet --output out/
    bfpack demo
    bfpack export out/ --format megatron --to train-megatron/
    bfpack report out/ [--html report.html]

Every config field has a flag (``bfpack pack --help`` lists them). A user mistake
(bad value, missing input, wrong column) ends with one line on stderr and exit
status 2, before Spark starts; a run that fails its audit or reject limit, with
exit status 1.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
import sys
from collections.abc import Sequence
from typing import Any, NoReturn, get_origin

from bfpack_spark import __version__
from bfpack_spark.config import DEBUG_ENV, ConfigError, PackConfig, field_specs, load_config
from bfpack_spark.constants import EXPORT_FORMATS, PYTHON_STDLIB, RETIRED_EXPORT_FORMATS
from bfpack_spark.errors import InputError
from bfpack_spark.flags import coerce_value, flag_kind, shown_default
from bfpack_spark.io.store.lock import RunLockedError
from bfpack_spark.io.tables.read import DeltaError
from bfpack_spark.stats.packing import format_comparison
from bfpack_spark.tokenize import TokenizerError

log = logging.getLogger("bfpack")

USER_ERRORS = (ConfigError, InputError, TokenizerError)


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML config (see conf/); flags override it")
    for section, flag, f, hint in field_specs():
        dest = f"{section}.{f.name}"
        default = shown_default(f)
        shown = "" if default in (None, "", "null", "[]", "{}") else f"; default {default}"
        help_text = f"{f.metadata['help']} [{section}.{f.name}{shown}]".replace("%", "%%")
        kind, metavar, choices = flag_kind(hint)
        if kind == "switch":
            parser.add_argument(f"--{flag}", dest=dest, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(f"--{flag}", dest=dest, action="append" if kind == "repeated" else "store",
                                default=argparse.SUPPRESS, choices=choices, metavar=metavar, help=help_text)


def _overrides(ns: argparse.Namespace) -> dict[str, Any]:
    hints = {f"{section}.{f.name}": hint for section, _, f, hint in field_specs()}
    out: dict[str, Any] = {}
    for key, value in vars(ns).items():
        if key not in hints:
            continue
        hint = hints[key]
        if get_origin(hint) is list:  # a path that exists as given is one path, comma or not
            value = [p for item in value for p in ([item] if os.path.exists(item) else item.split(",")) if p]
        elif get_origin(hint) is dict:
            pairs = {}
            for item in value:
                if "=" not in item:
                    raise ConfigError(f"{key}: expected KEY=VALUE, got {item!r}")
                k, v = item.split("=", 1)
                pairs[k] = v
            value = pairs
        elif isinstance(value, str):
            value = coerce_value(key, value, hint)
        out[key] = value
    return out


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (not the whole usage block), like every other error,
    with the flag or choice it most likely meant; a flag is never guessed from its start (``--id-colum``
    is a typo, not ``--id-column``: it gets "did you mean --id-column?")."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{"allow_abbrev": False, **kwargs})
        self.seen: list[str] = []  # the command line (main sets it): which subcommand an error is about

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}{self._suggestion(message)} (see {self._help_of()} --help)\n")

    def _command(self) -> argparse.ArgumentParser | None:
        """The subcommand's parser, where the command line names one."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                return next((action.choices[a] for a in self.seen if a in action.choices), None)
        return None

    def _help_of(self) -> str:
        command = self._command()
        return command.prog if command is not None else self.prog

    def _suggestion(self, message: str) -> str:
        """"; did you mean --output?" for a flag or choice close to one that exists; else nothing."""
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if choice:
            options = re.findall(r"'([^']*)'", choice.group(2))
            close = difflib.get_close_matches(choice.group(1), options, n=1, cutoff=0.5)
            return f"; did you mean {close[0]!r}?" if close else ""
        if message.startswith("unrecognized arguments:"):
            parser = self._command() or self
            flags = [o for o in parser._option_string_actions if o.startswith("--")]
            for given in message.split(":", 1)[1].split():
                if given.startswith("--"):
                    close = difflib.get_close_matches(given.split("=", 1)[0], flags, n=1, cutoff=0.6)
                    if close:
                        return f"; did you mean {close[0]}?"
        return ""


EXIT_STATUS = ("exit status: 0 done (or nothing to do), 1 the run failed (nothing committed), "
               "2 a usage or input error (found before anything is read or locked)")


def _export_format(value: str) -> str:
    if value in RETIRED_EXPORT_FORMATS:
        raise argparse.ArgumentTypeError(RETIRED_EXPORT_FORMATS[value])
    return value


def build_parser() -> _Parser:
    parser = _Parser(
        prog="bfpack", description="Best-fit packing of text corpora into fixed-length LLM training "
                                   "sequences, on Spark, into Delta tables.",
        epilog="every setting of a run is a flag of its command: see bfpack pack --help (and bfpack COMMAND "
               "--help for the others). " + EXIT_STATUS)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    common = _Parser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="only warnings and the summary")
    common.add_argument("--debug", action="store_true", help="show the stack trace when a run fails")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    pack = sub.add_parser("pack", parents=[common],
                          help="read, tokenize and pack a corpus (JSONL, Parquet, Delta, text)",
                          description="Read a corpus, tokenize it, pack it and write the Delta tables "
                                      "sequences, documents, rejects, inputs and stats under --output.",
                          epilog=EXIT_STATUS)
    _add_config_flags(pack)
    tok = sub.add_parser("pack-tokenized", parents=[common],
                         help="pack an already tokenized corpus (id + token list columns)",
                         description="Pack documents that are already tokenized: a Parquet/Delta/JSONL "
                                     "table with an id column and a list<int> token column "
                                     "(--token-column, default tokens).", epilog=EXIT_STATUS)
    _add_config_flags(tok)
    demo = sub.add_parser("demo", parents=[common],
                          help="pack this Python's standard library sources (no download needed)",
                          description="Pack the running Python's standard-library sources with "
                                      "cl100k_base at L=2048 into out/demo; under a minute on 2 cores.")
    _add_config_flags(demo)
    export = sub.add_parser("export", parents=[common],
                            help="export the sequences table for trainers (megatron, olmo, hf)",
                            description="Export the sequences table under ROOT (its current Delta snapshot) to "
                                        "DIR, one shard per table file, written by Spark tasks on any store: "
                                        "--format megatron (.bin/.idx for Megatron-LM / NeMo), olmo (token and "
                                        "label-mask files for OLMo-core), hf (datasets.load_from_disk, TRL's "
                                        "padding-free columns). DIR/manifest.json, written last, lists the files "
                                        "and the settings to train with.", epilog=EXIT_STATUS)
    export.add_argument("root", metavar="ROOT", help="output root of a bfpack run (local path or s3://...)")
    export.add_argument("--format", required=True, choices=EXPORT_FORMATS, type=_export_format, dest="fmt",
                        help="what to write for which trainer (see above)")
    export.add_argument("--to", required=True, metavar="DIR",
                        help="directory to write (new, or an unfinished export of the same table)")
    export.add_argument("--run-id", metavar="R", help="only this run's sequences (default: all runs)")
    export.add_argument("--seq-length", type=int, metavar="N",
                        help="megatron, olmo: rows of N tokens (default: the packed L; pack at L-1 and export "
                             "at L to end every row with EOS)")
    export.add_argument("--master", metavar="URL", help="Spark master (default: local[*])")
    export.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                        help="object-store settings, as for pack (AWS_ENDPOINT_URL, AWS_REGION, ...)")
    rep = sub.add_parser("report", parents=[common], help="the runs under an output root, with plots (--html)",
                         description="Print the run history of the output root ROOT; with --html, also write "
                                     "one self-contained page with the packing plots of a run (default: the latest).")
    rep.add_argument("root", metavar="ROOT", help="output root of bfpack runs")
    rep.add_argument("--html", metavar="FILE", help="write the HTML report here")
    rep.add_argument("--run-id", metavar="R", help="the run to plot (default: the latest)")
    return parser


def config_from_args(args: argparse.Namespace) -> PackConfig:
    overrides = _overrides(args)
    if args.command == "pack-tokenized":
        overrides.setdefault("input.token_column", "tokens")
    if args.command == "demo":
        overrides.setdefault("input.paths", [PYTHON_STDLIB])
        overrides.setdefault("output.output", "out/demo")
    return load_config(args.config, overrides).validate()


def print_summary(result, out=sys.stdout) -> None:
    s = result.stats
    print(file=out)
    if result.nothing_new:
        print(f"no new input file since the last run into {result.output}; nothing to do.", file=out)
        return
    if result.already_committed:
        print(f"run {result.run_id} was already committed to {result.output}; nothing written.", file=out)
        return
    print(format_comparison({"best-fit" if s["strategy"] == "bfd" else s["strategy"]: result.packing,
                             "concat": result.concat}), file=out)
    print(f"\nrun {result.run_id}: {s['documents_read']:,} documents read, {s['documents_packed']:,} packed, "
          f"{s['documents_rejected']:,} rejected; audit {'passed' if s['audit_passed'] else 'FAILED'}", file=out)
    print(f"tables: {', '.join(result.table(t) for t in ('sequences', 'documents', 'rejects', 'inputs', 'stats'))}",
          file=out)
    times = ", ".join(f"{k} {v:.1f}s" for k, v in s["stage_seconds"].items())
    print(f"time: {sum(s['stage_seconds'].values()):.1f}s ({times})", file=out)
    if s.get("requests_retried"):
        print(f"object store: {s['requests_retried']:,} requests retried (throttled or dropped)", file=out)
    if s.get("resumed_read_groups") or s.get("resumed_assembly_groups"):
        groups = s["input_groups"]
        print(f"resumed: {s['resumed_read_groups']} of {groups} read tasks, {s['resumed_assembly_groups']} of "
              f"{groups} assembly groups (finished by an earlier attempt of the run)", file=out)


def _named_as_given(message: str, args: argparse.Namespace) -> str:
    """A config error about ``section.field`` names what the user wrote: the flag, when it came from one,
    or the YAML key and its file (a setting left at its default keeps its key)."""
    key, sep, rest = message.partition(": ")
    flags = {f"{section}.{f.name}": flag for section, flag, f, _ in field_specs()}
    if not sep or key not in flags:
        return message
    if key in vars(args):
        return f"--{flags[key]}: {rest}"
    if args.config:
        return f"{key} (in {args.config}): {rest}"
    return message


def _one_line(exc: BaseException) -> str:
    return str(exc).replace("\n", " ")


def _export(args: argparse.Namespace) -> int:
    from bfpack_spark.export import ExportError, export
    from bfpack_spark.io.store.fs import set_storage_options
    from bfpack_spark.spark.session import quiet_native_stderr

    try:
        options = _overrides(argparse.Namespace(**{"output.storage_options": args.storage_option}))
        set_storage_options(options["output.storage_options"])
        with quiet_native_stderr():
            summary = export(args.root, args.fmt, args.to, run_id=args.run_id, seq_length=args.seq_length,
                             master=args.master)
    except (DeltaError, ExportError, ConfigError) as exc:
        print(f"bfpack: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:
        if args.debug:
            raise
        from bfpack_spark.spark.session import first_line

        print(f"bfpack: export failed: {type(exc).__name__}: {first_line(exc)}\n(nothing was published; rerun the "
              f"same command to finish it, with --debug for the stack trace)", file=sys.stderr)
        return 1
    if summary.get("already_exported"):
        print(f"{args.to} already holds this export of {args.root}; nothing written")
        return 0
    print(f"exported {summary['sequences']:,} sequences ({summary['tokens']:,} tokens, rows of {summary['seq_len']}) "
          f"of {args.root} to {args.to} as {args.fmt}: {len(summary['shards'])} shards, {args.to}/manifest.json")
    return 0


def _report(args: argparse.Namespace) -> int:
    from bfpack_spark.report import report

    try:
        print(report(args.root, args.html, args.run_id))
    except (DeltaError, OSError) as exc:
        print(f"bfpack: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    parser.seen = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("matplotlib", "py4j"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.debug:
        os.environ[DEBUG_ENV] = "1"  # JVM warnings too
    if args.command == "export":
        return _export(args)
    if args.command == "report":
        return _report(args)
    try:
        config = config_from_args(args)
    except USER_ERRORS as exc:
        print(f"bfpack: error: {_named_as_given(_one_line(exc), args)}", file=sys.stderr)
        return 2
    # Imported here: pyspark loads slowly, and mistakes above are reported without it.
    from bfpack_spark.job import AuditError, run
    from bfpack_spark.spark.session import SparkStartError, first_line, quiet_native_stderr

    try:
        with quiet_native_stderr():
            result = run(config)
    except (*USER_ERRORS, SparkStartError) as exc:
        print(f"bfpack: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except (AuditError, DeltaError, RunLockedError) as exc:
        print(f"bfpack: run failed: {_one_line(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:
        if args.debug:
            raise
        stage = getattr(exc, "bfpack_stage", None)
        where = f" in stage {stage}" if stage else ""
        print(f"bfpack: run failed{where}: {type(exc).__name__}: {first_line(exc)}\n"
              f"(nothing was committed; rerun with --debug for the stack trace)", file=sys.stderr)
        return 1
    print_summary(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
