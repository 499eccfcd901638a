"""Where stderr is not a terminal (spark-submit, a scheduler, a log file), a long stage says how far it is."""

import json
import os
import re
import subprocess
import sys
from datetime import datetime

from corpora import write_jsonl

LINE = re.compile(r"^(\d\d:\d\d:\d\d) INFO bfpack: stage read: (\d+)/(\d+) tasks, ([\d,]+) documents, ([\d,]+) tokens, "
                  r"([\d.]+) MB/s, ETA (--:--|\d+:\d\d)$")


def test_a_run_logged_to_a_file_says_its_progress_every_interval(tmp_path):
    (tmp_path / "in").mkdir()
    for f in range(4):
        write_jsonl(tmp_path / "in" / f"part-{f}.jsonl",
                    [{"id": f"{f}-{i}", "text": f"progress of a long stage, line {i} " * 20} for i in range(500)])
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps({"read:2": "slow:65"}))  # one read task takes a minute
    with open(tmp_path / "stderr.log", "w") as err:  # not a terminal
        done = subprocess.run(
            [sys.executable, "-m", "bfpack_spark.cli", "pack", "--input", str(tmp_path / "in"), "--output",
             str(tmp_path / "out"), "--min-partitions", "4", "--master", "local[2]", "--progress-seconds", "5",
             "--spark-conf", f"spark.executorEnv.BFPACK_FAULTS_FILE={faults}"],
            stdout=subprocess.PIPE, stderr=err, text=True, timeout=600,
            env={**os.environ, "BFPACK_FAULTS_FILE": str(faults)})
    log = (tmp_path / "stderr.log").read_text()
    assert done.returncode == 0, log[-3000:]
    lines = [m for m in map(LINE.match, log.splitlines()) if m]
    assert len(lines) >= 8, log  # 65 s of a stage, a line every 5 s
    assert all(int(m.group(3)) == 4 for m in lines)
    waiting = [m for m in lines if m.group(2) == "3"]  # three groups read, the slow one not yet
    assert len(waiting) >= 5, log
    assert int(waiting[-1].group(4).replace(",", "")) == 1500 and int(waiting[-1].group(5).replace(",", "")) > 0
    assert float(waiting[-1].group(6)) > 0 and waiting[-1].group(7) != "--:--"
    times = [datetime.strptime(m.group(1), "%H:%M:%S") for m in lines]
    gaps = [(b - a).total_seconds() % 86400 for a, b in zip(times, times[1:])]
    assert all(3 <= g <= 8 for g in gaps), gaps  # steady
    assert re.search(r"INFO bfpack: stage read done in \d+\.\ds", log)
    assert "\r" not in log  # no progress bar in a file
