"""The Spark session: local defaults that work on a laptop, cluster settings left to spark-submit."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import pyspark
from pyspark import SparkConf, SparkContext
from pyspark.java_gateway import launch_gateway
from pyspark.sql import SparkSession

from bfpack_spark.config import DEBUG_ENV
from bfpack_spark.io.store.fs import STORAGE_ENV
from bfpack_spark.io.store.retry import RETRY_ENV

#: Settings bfpack relies on; a user's --spark-conf wins over them.
DEFAULTS = {
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.sql.execution.arrow.maxRecordsPerBatch": "2048",
    "spark.sql.adaptive.enabled": "true",
    "spark.sql.shuffle.partitions": "8",
    "spark.ui.showConsoleProgress": "false",  # bfpack draws its own (spark/progress.py)
    "spark.sql.parquet.compression.codec": "zstd",
    "spark.python.daemon.module": "bfpack_spark.daemon",  # workers forked with the tasks' imports done
}
LOCAL_DEFAULTS = {
    "spark.driver.memory": "8g",
    "spark.ui.enabled": "false",
}


QUIET_LOG4J = os.path.join(os.path.dirname(__file__), "log4j2-quiet.properties")
#: what the driver JVM prints at start whatever its log level: Java's module notice, the shell's hint; and
#: what pyarrow's S3 client prints in local tasks (whose stderr is the JVM's) about requests it retries
S3_RETRY_NOISE = rb"\S*arrow/filesystem/s3fs\.cc:\d+: "
JVM_START_NOISE = re.compile(rb"WARNING: Using incubator modules|Setting default log level to|"
                             rb"To adjust logging level use sc\.setLogLevel|" + S3_RETRY_NOISE)


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


class SparkStartError(RuntimeError):
    """Spark could not start as configured (master, memory, classpath)."""


def first_line(exc: BaseException) -> str:
    """The exception's message in one line, without Java's stack trace. For an error from the
    JVM ("An error occurred while calling o286.parquet."), the line that says why: the deepest
    "Caused by:", else the Java exception's own message."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if lines[0].startswith("An exception was thrown from the Python worker"):  # a task's own exception
        raised = [line for line in lines if re.match(r"[\w.]+(Error|Exception|Fault|Interrupt|Exit)\b", line)]
        if raised:
            return raised[-1][:500]
    if lines[0].startswith("An error occurred while calling"):
        causes = [line.removeprefix("Caused by: ") for line in lines if line.startswith("Caused by:")]
        java = [line.lstrip(": ") for line in lines[1:] if not line.startswith("at ")]
        if causes or java:
            return (causes[-1] if causes else java[0])[:500]
    return lines[0][:500]


CLASS_CACHE_ENV = "BFPACK_CLASS_CACHE"
#: a finished archive dump is older than this (a dump takes seconds, after the JVM's work)
_DUMP_SECONDS = 60
#: an archive no run has used for this long belongs to an install that is gone
_UNUSED_DAYS = 30
#: the JVM's own notices about the archive stay out of the console
_QUIET_CDS = ["-Xlog:cds=off", "-Xlog:cds+dynamic=off"]


def class_archive_options(cache_dir: str | None = None) -> list[str]:
    """JVM options that share the driver's loaded classes between runs (Java's AppCDS).

    A Spark driver loads about 20,000 classes at start and on its first queries; reading them
    from an archive of the last run's takes seconds off every run. The first run on a machine
    (per Java and pyspark install) dumps the archive when its JVM exits, after bfpack is done;
    a later run promotes a finished dump and maps it. An archive the JVM cannot use (another
    Java build, another class path) is ignored by the JVM. ``BFPACK_CLASS_CACHE=0`` turns it
    off; the archive (about 160 MB) lives under ``$XDG_CACHE_HOME/bfpack`` (``~/.cache``).
    """
    if os.environ.get(CLASS_CACHE_ENV, "1") == "0":
        return []
    java = os.path.join(os.environ["JAVA_HOME"], "bin", "java") if os.environ.get("JAVA_HOME") \
        else shutil.which("java")
    if not java:
        return []
    key = hashlib.sha256(f"{os.path.realpath(java)}\0{pyspark.__version__}\0{pyspark.__file__}".encode())
    root = cache_dir or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "bfpack")
    archive = os.path.join(root, f"spark-driver-{key.hexdigest()[:16]}.jsa")
    try:
        names = os.listdir(root) if os.path.isdir(root) else []
        dumps = {path: mtime for f in names if f.startswith(os.path.basename(archive) + ".")
                 if (mtime := _mtime(path := os.path.join(root, f))) is not None}
        done = sorted((d for d, mtime in dumps.items() if time.time() - mtime > _DUMP_SECONDS), key=lambda d: dumps[d])
        if not os.path.exists(archive):
            if done:
                os.replace(done.pop(), archive)
            elif dumps:  # another run's dump may be under way
                return []
            else:
                os.makedirs(root, exist_ok=True)
                return [f"-XX:ArchiveClassesAtExit={archive}.{uuid.uuid4().hex[:8]}.tmp", *_QUIET_CDS]
        _prune(root, archive, done)
        return [f"-XX:SharedArchiveFile={archive}", *_QUIET_CDS]
    except OSError:  # a cache that cannot be written or read only costs the speed-up
        return []


def _mtime(path: str) -> float | None:
    """A file's modification time, or None once another run has removed it."""
    try:
        return os.path.getmtime(path)
    except OSError:
        return None


def _prune(root: str, archive: str, extra_dumps: list[str]) -> None:
    """Keep the cache to one archive per install in use: remove the dumps of runs that raced to
    write the same archive, and the archives (and dumps) of installs unused for ``_UNUSED_DAYS``
    (a removed virtualenv, an older pyspark). The archive in use is touched to mark it used.
    Best effort: a file another run removed first, or one this user may not remove, stays."""
    stale = time.time() - _UNUSED_DAYS * 86400
    old = [os.path.join(root, name) for name in os.listdir(root) if name.startswith("spark-driver-")]
    old = [path for path in old if not path.startswith(archive) and (_mtime(path) or stale) < stale]
    for path, action in [(archive, os.utime)] + [(path, os.remove) for path in extra_dumps + old]:
        with suppress(OSError):
            action(path)


def local_master(master: str | None, task_attempts: int) -> str:
    """``local[N]`` (default ``local[*]``) with ``task_attempts`` attempts per task, ``local[N,F]``: plain
    local mode tries a task once, so one transient failure would end the run. Others as given."""
    if master is None:
        return f"local[*,{task_attempts}]"
    plain = re.fullmatch(r"local(\[(\*|\d+)\])?", master)
    return f"local[{plain.group(2) or 1},{task_attempts}]" if plain else master


def _submitted_conf() -> SparkConf:
    """What spark-submit was given (``--master``, ``--conf``, spark-defaults.conf) when it started this
    process: its JVM is already running, and a SparkConf reads them from it. Empty otherwise (a
    SparkConf made before any JVM holds nothing)."""
    if "PYSPARK_GATEWAY_PORT" in os.environ:  # set by spark-submit for the Python it starts
        SparkContext._ensure_initialized()  # connects to spark-submit's JVM; starts none
    return SparkConf()


def get_spark(master: str | None = None, app_name: str = "bfpack", conf: dict[str, str] | None = None,
              task_attempts: int = 4) -> SparkSession:
    """The active session, or a new one: ``master`` or spark-submit's, else ``local[*,F]``
    (F = ``task_attempts``, also spark.task.maxFailures on a cluster unless set). bfpack's defaults
    give way to what spark-submit was given; ``conf`` (the config's ``spark.conf``) overrides both."""
    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    given = _submitted_conf()
    submitted = given.contains("spark.master")
    builder = SparkSession.builder.appName(app_name)
    settings = {**DEFAULTS, "spark.task.maxFailures": str(task_attempts)}
    if master or not submitted:
        master = local_master(master, task_attempts)
        builder = builder.master(master)
        settings.update(LOCAL_DEFAULTS)
        # Spark starts Python workers with PYSPARK_PYTHON, else `python3` from PATH; on this machine
        # (local, local-cluster) they must run this interpreter, the one with bfpack installed.
        if master.startswith("local") and "spark.pyspark.python" not in (conf or {}):
            os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        java_options = class_archive_options()  # the driver JVM starts here
        if not debugging():  # only its errors reach the console
            java_options.append(f"-Dlog4j.configurationFile=file:{QUIET_LOG4J}")
        settings["spark.driver.extraJavaOptions"] = " ".join(java_options)
    settings = {key: value for key, value in settings.items() if not given.contains(key)}  # spark-submit's win
    for env in (STORAGE_ENV, RETRY_ENV):  # they reach executors on any cluster (Spark's UI redacts secrets)
        if env in os.environ:
            settings["spark.executorEnv." + env] = os.environ[env]
    if "NUMBA_CACHE_DIR" in os.environ:
        settings["spark.executorEnv.NUMBA_CACHE_DIR"] = os.environ["NUMBA_CACHE_DIR"]
    settings.update(conf or {})
    for key, value in settings.items():
        builder = builder.config(key, value)
    try:
        if not submitted and not debugging():
            _start_quiet_driver(SparkConf().setAll([*settings.items(), ("spark.master", master or ""),
                                                    ("spark.app.name", app_name)]))
        spark = builder.getOrCreate()
    except Exception as exc:  # Java and Python errors of all kinds; the first line says which
        raise SparkStartError(f"cannot start Spark (master {master or 'from spark-submit'}): "
                              f"{first_line(exc)}") from None
    spark.sparkContext.setLogLevel("WARN" if debugging() else "ERROR")
    return spark


def _start_quiet_driver(conf: SparkConf) -> None:
    """Start the driver JVM (as the builder would) with its stderr passed on by a thread that drops
    the start-up notices; its error lines still reach the console, also when it fails to start."""
    read_end, write_end = os.pipe()  # its stdout too: a pipe the caller reads never waits for it
    _forward_lines(read_end, 2, JVM_START_NOISE, "jvm-stderr")
    try:
        gateway = launch_gateway(conf, popen_kwargs={"stdout": write_end, "stderr": write_end})
    finally:
        os.close(write_end)  # the JVM holds its own copy; the thread ends when the JVM does
    SparkContext(conf=conf, gateway=gateway)


def _forward_lines(read_end: int, to_fd: int, noise: re.Pattern[bytes], name: str) -> threading.Thread:
    """A thread passing the lines of pipe ``read_end`` on to ``to_fd``, but those ``noise`` matches; it
    ends when every write end of the pipe is closed."""
    def forward() -> None:
        with os.fdopen(read_end, "rb") as pipe:
            for line in pipe:
                if not noise.match(line):
                    os.write(to_fd, line)

    thread = threading.Thread(target=forward, name=name, daemon=True)
    thread.start()
    return thread


@contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """pyarrow's S3 client writes notices of the requests it retries straight to this process's stderr
    (file descriptor 2, past Python's logging), also on the driver; while this runs (unless debugging),
    fd 2 passes through a filter that drops them."""
    if debugging():
        yield
        return
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    console = os.dup(2)
    os.dup2(write_end, 2)
    os.close(write_end)
    thread = _forward_lines(read_end, console, re.compile(S3_RETRY_NOISE), "stderr-filter")
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(console, 2)  # the pipe's last write end closes: the thread forwards what is left, then ends
        thread.join(timeout=5)
        os.close(console)
