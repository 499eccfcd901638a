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
def spark(faults_file):
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
