"""Wrong flags, paths and settings get one clear line and exit 2 before anything is read."""

import subprocess
import sys

import pytest
from deltalake import DeltaTable

from bfpack_spark.config import load_config
from bfpack_spark.errors import InputError
from bfpack_spark.job import run
from bfpack_spark.spark.session import first_line

from corpora import write_jsonl


def bfpack(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bfpack_spark.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


@pytest.mark.parametrize("flags, words", [
    (["--seq-len", "2147483648"], "at most 16,777,216"),
    (["--seq-len", "99999999999"], "at most 16,777,216"),
    (["--seq-len", ""], "expected an integer, got ''"),
    (["--seq-len", "0"], "error: --seq-len: must be at least 1, got 0"),  # the flag as typed, not its YAML key
    (["--residual-fill", "2"], "error: --residual-fill: must be within [0, 1]"),
    (["--max-document-bytes", "3000000000"], "below 2 GiB"),
    (["--id-colum", "url"], "unrecognized arguments: --id-colum url; did you mean --id-column? (see bfpack pack "
                            "--help)"),  # a typo is not taken for --id-column, but suggested
    (["--ouput", "x"], "did you mean --output?"),
])
def test_out_of_range_settings_stop_before_reading(tmp_path, flags, words):
    (tmp_path / "in.jsonl").write_text('{"text": "x"}\n')
    proc = bfpack("pack", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out"), *flags)
    assert proc.returncode == 2 and words in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_setting_from_a_config_file_is_named_by_its_key_and_file(tmp_path):
    (tmp_path / "c.yaml").write_text("packing:\n  seq_len: 0\n")
    proc = bfpack("pack", "--config", str(tmp_path / "c.yaml"), "--input", "x", "--output", str(tmp_path / "o"))
    assert proc.returncode == 2 and f"packing.seq_len (in {tmp_path / 'c.yaml'}): must be at least 1" in proc.stderr


@pytest.mark.parametrize("args, words", [
    (["pak", "--input", "x"], "invalid choice: 'pak' (choose from 'pack', 'pack-tokenized', 'demo', 'export', "
                              "'report'); did you mean 'pack'? (see bfpack --help)"),
    (["export", "o", "--format", "olm", "--to", "x"], "did you mean 'olmo'? (see bfpack export --help)"),
    (["export", "o", "--format", "npy", "--to", "x"], "--format npy was retired"),
])
def test_misspelled_commands_and_choices_get_a_suggestion(args, words):
    proc = bfpack(*args)
    assert proc.returncode == 2 and words in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_help_shows_defaults_and_lists_no_retired_choice():
    pack = bfpack("pack", "--help").stdout
    assert "[packing.seq_len; default 2048]" in " ".join(pack.split())
    assert "[packing.strategy; default bfd]" in " ".join(pack.split())
    export = bfpack("export", "--help").stdout
    assert "{megatron,olmo,hf}" in export and "npy" not in export
    assert "bfpack pack --help" in bfpack("--help").stdout


def test_an_output_inside_an_input_is_refused_naming_both(tmp_path):
    (tmp_path / "corpus").mkdir()
    write_jsonl(tmp_path / "corpus" / "a.jsonl", [{"text": "hello"}])
    proc = bfpack("pack", "--input", str(tmp_path / "corpus"), "--output", str(tmp_path / "corpus" / "out"))
    assert proc.returncode == 2 and "overlap" in proc.stderr and str(tmp_path / "corpus") in proc.stderr


def test_a_path_with_a_comma_is_one_path():
    import tempfile
    from pathlib import Path

    from bfpack_spark.cli import build_parser, config_from_args

    with tempfile.TemporaryDirectory() as tmp:
        odd = Path(tmp) / "a,b.jsonl"
        odd.write_text('{"text": "x"}\n')
        args = build_parser().parse_args(["pack", "--input", str(odd), "--output", str(Path(tmp) / "o")])
        assert config_from_args(args).input.paths == [str(odd)]
        args = build_parser().parse_args(["pack", "--input", "x.jsonl,y.jsonl", "--output", "o"])
        assert config_from_args(args).input.paths == ["x.jsonl", "y.jsonl"]


def test_jvm_errors_say_their_cause_in_one_line():
    jvm = Exception("An error occurred while calling o286.parquet.\n: org.apache.spark.SparkException: Job aborted."
                    "\n\tat org.apache.spark.X(X.scala:1)\nCaused by: java.io.IOException: No space left on device"
                    "\n\tat java.io.Y(Y.java:2)")
    assert first_line(jvm) == "java.io.IOException: No space left on device"


def test_an_append_with_other_packing_settings_is_refused_and_changes_nothing(spark, tmp_path):
    write_jsonl(tmp_path / "in.jsonl", [{"id": f"d{i}", "text": "word " * (i + 3)} for i in range(30)])
    settings = {"input.paths": [str(tmp_path / "in.jsonl")], "output.output": str(tmp_path / "out"),
                "packing.seq_len": 64}
    run(load_config(None, settings), spark)
    before = {t: DeltaTable(str(tmp_path / "out" / t)).version() for t in ("sequences", "stats")}
    with pytest.raises(InputError, match=r"packing\.seq_len 64 \(theirs\) != 128.*--mode overwrite"):
        run(load_config(None, {**settings, "packing.seq_len": 128, "output.mode": "append"}), spark)
    with pytest.raises(InputError, match=r"packing\.strategy 'bfd' \(theirs\) != 'concat'"):
        run(load_config(None, {**settings, "packing.strategy": "concat", "output.mode": "append"}), spark)
    assert before == {t: DeltaTable(str(tmp_path / "out" / t)).version() for t in ("sequences", "stats")}


def test_without_a_mode_another_run_is_never_replaced_and_the_same_one_is_a_no_op(spark, tmp_path):
    write_jsonl(tmp_path / "in.jsonl", [{"id": f"d{i}", "text": "word " * (i + 3)} for i in range(30)])
    settings = {"input.paths": [str(tmp_path / "in.jsonl")], "output.output": str(tmp_path / "out"),
                "packing.seq_len": 64}
    first = run(load_config(None, settings), spark)
    assert run(load_config(None, settings), spark).already_committed  # the same command again: nothing to do
    before = {t: DeltaTable(str(tmp_path / "out" / t)).version() for t in ("sequences", "stats")}
    proc = bfpack("pack", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out"), "--seq-len", "128")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert f"holds run {first.run_id}, packed " in lines[0] and "at seq_len 64 with cl100k_base" in lines[0]
    assert "give --mode overwrite to replace it" in lines[0]
    assert before == {t: DeltaTable(str(tmp_path / "out" / t)).version() for t in ("sequences", "stats")}
    replaced = run(load_config(None, {**settings, "packing.seq_len": 128, "output.mode": "overwrite"}), spark)
    assert replaced.stats["seq_len"] == 128 and replaced.stats["mode"] == "overwrite"


@pytest.mark.parametrize("mode", [[], ["--mode", "overwrite"], ["--mode", "append"]])
def test_a_root_holding_what_bfpack_did_not_write_is_refused_in_every_mode(tmp_path, mode):
    write_jsonl(tmp_path / "in.jsonl", [{"text": "hello"}])
    out = tmp_path / "shared"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    (out / ".DS_Store").write_text("")  # hidden files are let be
    proc = bfpack("pack", "--input", str(tmp_path / "in.jsonl"), "--output", str(out), *mode)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert f"the output root {out} holds what bfpack did not write (notes.txt, sub/)" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [".DS_Store", "notes.txt", "sub"]  # nothing written


def test_a_file_in_a_table_folder_that_bfpack_did_not_write_is_refused(spark, tmp_path):
    write_jsonl(tmp_path / "in.jsonl", [{"text": "hello"}])
    settings = {"input.paths": [str(tmp_path / "in.jsonl")], "output.output": str(tmp_path / "out")}
    run(load_config(None, settings), spark)
    (tmp_path / "out" / "sequences" / "mydata.csv").write_text("a,b")
    with pytest.raises(InputError, match=r"holds what bfpack did not write \(sequences/mydata\.csv\)"):
        run(load_config(None, {**settings, "output.mode": "overwrite"}), spark)


def test_a_misspelled_id_column_is_an_error_listing_the_columns(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"url": "u1", "text": "hello"}])
    proc = bfpack("pack", "--input", str(tmp_path / "a.jsonl"), "--output", str(tmp_path / "out"), "--id-column", "uid")
    assert proc.returncode == 2 and "'uid' is in no input file" in proc.stderr and "text, url" in proc.stderr
    assert not (tmp_path / "out" / "_bfpack.lock").exists()


def test_the_driver_class_archive_is_dumped_once_then_shared(tmp_path, monkeypatch):
    """The JVM options of Java's class-data sharing: dump on the first run, promote a finished dump,
    share it after; a dump under way is left alone, and BFPACK_CLASS_CACHE=0 turns it off."""
    import os
    import time

    from bfpack_spark.spark.session import class_archive_options

    [dump, *quiet] = class_archive_options(str(tmp_path))
    assert dump.startswith("-XX:ArchiveClassesAtExit=") and quiet == ["-Xlog:cds=off", "-Xlog:cds+dynamic=off"]
    written = dump.split("=", 1)[1]
    open(written, "wb").close()  # the JVM writes it when it exits
    assert class_archive_options(str(tmp_path)) == []  # maybe still being written
    os.utime(written, (time.time() - 3600, time.time() - 3600))
    shared = class_archive_options(str(tmp_path))
    assert shared[0] == f"-XX:SharedArchiveFile={written.rsplit('.', 2)[0]}" and not os.path.exists(written)
    assert class_archive_options(str(tmp_path)) == shared
    # a second run that raced to dump the same archive, and the archive of an install long gone: removed
    raced, gone = f"{written.rsplit('.', 2)[0]}.0123abcd.tmp", str(tmp_path / "spark-driver-0000000000000000.jsa")
    for path in (raced, gone):
        open(path, "wb").close()
        os.utime(path, (time.time() - 40 * 86400, time.time() - 40 * 86400))
    assert class_archive_options(str(tmp_path)) == shared
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(written.rsplit(".", 2)[0])]
    monkeypatch.setenv("BFPACK_CLASS_CACHE", "0")
    assert class_archive_options(str(tmp_path)) == []


def test_a_folder_of_files_bfpack_does_not_read_says_what_it_found_and_the_flag(tmp_path):
    """A folder of plain text files is not "no file": the line says what is there, and the flag that reads it."""
    (tmp_path / "txt").mkdir()
    for name in ("a.txt", "b.txt", "notes.md"):
        (tmp_path / "txt" / name).write_text("words")
    proc = bfpack("pack", "--input", str(tmp_path / "txt"), "--output", str(tmp_path / "out"))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "holds 3 files but none is .jsonl" in proc.stderr and "found .md, .txt" in proc.stderr
    assert "--input-format text" in proc.stderr
    (tmp_path / "txt" / "c.jsonl").write_text('{"text": "x"}\n')  # one data file among them: read, not refused
    from bfpack_spark.io.listing.listing import list_inputs

    assert [s for s in list_inputs([str(tmp_path / "txt")]).column("source")] == ["c.jsonl"]
