"""A run that loses its driver, rerun: the rerun's time against an undisturbed run's.

    python benchmarks/bench_resume.py                      # 500 MB of text, three rounds
    python benchmarks/bench_resume.py --mb 200 --repeat 1
    python benchmarks/bench_resume.py --code /tmp/before   # another checkout (the code before a change)

Each round packs the same corpus (this machine's documentation and sources as JSON lines, as
``bench_many_files.py`` builds it) three ways, each ``bfpack pack`` in a fresh process: undisturbed;
killed (SIGKILL to the driver's whole process group: its JVM and Python workers too) at 75% of the
undisturbed run's time; and the same command again, which finishes the run. It prints the rerun's
time against the undisturbed one's, each round's and their median.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_many_files import documents  # noqa: E402

CODE: str | None = None


def command(corpus: Path, out: Path) -> tuple[list[str], dict, str | None]:
    env = dict(os.environ)
    if CODE:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [CODE, env.get("PYTHONPATH")]))
    return ([sys.executable, "-m", "bfpack_spark.cli", "pack", "-q", "--input", str(corpus), "--output", str(out),
             "--master", "local[2]"], env, CODE)


def pack(corpus: Path, out: Path) -> tuple[float, str]:
    cmd, env, cwd = command(corpus, out)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return time.perf_counter() - t0, done.stdout


def killed_at(corpus: Path, out: Path, seconds: float) -> None:
    cmd, env, cwd = command(corpus, out)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=cwd,
                            start_new_session=True)
    time.sleep(seconds)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--at", type=float, default=0.75, help="kill at this share of the undisturbed time")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-resume"))
    parser.add_argument("--code", help="run the bfpack of this checkout")
    args = parser.parse_args()
    global CODE
    CODE = args.code
    corpus = args.workdir / f"corpus-{args.mb}mb"
    if not (corpus / "_done").exists():
        shutil.rmtree(corpus, ignore_errors=True)
        corpus.mkdir(parents=True)
        ids, texts = documents(args.mb)
        per = -(-len(ids) // 16)
        for f in range(16):
            with open(corpus / f"part-{f:02d}.jsonl", "w", encoding="utf-8") as fh:
                for i, t in zip(ids[f * per:(f + 1) * per], texts[f * per:(f + 1) * per]):
                    fh.write(json.dumps({"id": i, "text": t}) + "\n")
        (corpus / "_done").touch()
    rounds = []
    for r in range(args.repeat):
        out = args.workdir / "out"
        shutil.rmtree(out, ignore_errors=True)
        whole, _ = pack(corpus, out)
        shutil.rmtree(out, ignore_errors=True)
        killed_at(corpus, out, whole * args.at)
        rerun, summary = pack(corpus, out)
        resumed = next((line for line in summary.splitlines() if line.startswith("resumed:")), "resumed: nothing")
        rounds.append(rerun / whole)
        print(f"round {r + 1}: undisturbed {whole:.1f}s; killed at {whole * args.at:.1f}s; rerun {rerun:.1f}s, "
              f"{rerun / whole:.2f}x ({resumed})", flush=True)
    print(f"rerun / undisturbed, median of {len(rounds)}: {statistics.median(rounds):.2f}")


if __name__ == "__main__":
    main()
