import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def faults_file(tmp_path_factory):
    """Path of the failure-injection file that Spark tasks and the driver both watch."""
    from bfpack_spark import faults

    path = tmp_path_factory.mktemp("faults") / "faults.json"
    os.environ[faults.ENV] = str(path)
    return path


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 protocol server (moto) on a free loopback port, for the whole session.

    Started before Spark: the endpoint reaches Spark's Python workers through the environment.
    Yields a boto3 client to make buckets and objects with.
    """
    import socket
    import subprocess
    import time

    boto3 = pytest.importorskip("boto3")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ALLOW_HTTP": "true", "AWS_EC2_METADATA_DISABLED": "true"}
    os.environ.update(env)
    client = boto3.client("s3")
    for _ in range(100):
        try:
            client.list_buckets()
            break
        except Exception:
            time.sleep(0.1)
    yield client
    server.terminate()
    server.wait()


@pytest.fixture(scope="session")
def spark(faults_file, s3_server):
    """One local Spark session for the whole suite: 2 cores, task retries on, small shuffles."""
    from bfpack_spark.spark.session import get_spark

    session = get_spark("local[2,4]", "bfpack-tests", {
        "spark.sql.shuffle.partitions": "4",
        "spark.default.parallelism": "2",
        "spark.driver.memory": "3g",
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.executorEnv.BFPACK_FAULTS_FILE": str(faults_file),
    })
    yield session
    session.stop()


@pytest.fixture
def inject(faults_file):
    """inject({"read": "once"}) arms failure points for one test."""
    import json

    def arm(points: dict[str, str]) -> None:
        for fired in faults_file.parent.glob("faults.json.*.fired"):
            fired.unlink()
        faults_file.write_text(json.dumps(points))

    yield arm
    if faults_file.exists():
        faults_file.unlink()
    for fired in faults_file.parent.glob("faults.json.*.fired"):
        fired.unlink()


@pytest.fixture(autouse=True)
def _no_storage_options_from_an_earlier_test(monkeypatch):
    """A run in this process keeps its storage options (and retry policy) in the environment for the Spark
    processes it starts; the next test must not reach the store of an earlier one (a proxy now gone)."""
    from bfpack_spark.io.store.fs import STORAGE_ENV
    from bfpack_spark.io.store.retry import RETRY_ENV

    for name in (STORAGE_ENV, RETRY_ENV):
        monkeypatch.setenv(name, "")  # restored (unset) when the test ends, whatever the test's runs set
        monkeypatch.delenv(name)
