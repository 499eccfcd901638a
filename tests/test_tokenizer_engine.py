"""The fast tokenizer engine gives the reference's ids, on real corpora and on texts built to be hard,
for every tokenizer it is allowed to encode: these tests are what admits a tokenizer to the engine.

A tokenizer is used with gigatoken only if it is listed in fast_engine.py (_PROVEN_TIKTOKEN, _PROVEN_HF, _NORMALIZERS)
and, here, every listed entry is encoded both ways and compared id for id.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from bfpack_spark import fast_engine
from bfpack_spark.constants import DEFAULT_TOKENIZER, PYTHON_STDLIB
from bfpack_spark.fast_engine import FastEncoder, hf_structure, tiktoken_ranks
from bfpack_spark.io.listing.listing import list_inputs
from bfpack_spark.tokenize import encode_texts, load_tokenizer

from corpora import SHAPES, bos_tokenizer, llama3_style_tokenizer, shaped_tokenizer

REPO = Path(__file__).resolve().parents[1]


def _read(paths) -> list[str]:
    texts = []
    for path in paths:
        try:
            texts.append(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            continue
    return texts


@functools.cache
def demo_corpus() -> list[str]:
    """The demo's corpus: the running Python's standard-library sources."""
    return _read(list_inputs([PYTHON_STDLIB]).column("uri"))


def repo_corpus() -> list[str]:
    """This repository's own code and prose (the test corpora's sources, the docs)."""
    return _read(sorted(p for ext in ("py", "md", "yaml", "ipynb", "toml") for p in REPO.rglob(f"*.{ext}")
                        if ".venv" not in p.parts))


def _script_texts(rng: random.Random) -> list[str]:
    """Every assigned code point outside the surrogates, in texts of one block each (256 code points,
    shuffled, with spaces and newlines among them), and words per script (the first word of each
    character's Unicode name: LATIN, CJK, ARABIC, DEVANAGARI, HANGUL, ...) with their combining marks."""
    texts = []
    by_script: dict[str, list[str]] = {}
    for block in range(0, sys.maxunicode + 1, 256):
        chars = [chr(c) for c in range(block, block + 256)
                 if not 0xD800 <= c <= 0xDFFF and unicodedata.category(chr(c)) != "Cn"]
        for ch in chars:
            name = unicodedata.name(ch, "")
            if name:
                by_script.setdefault(name.split()[0], []).append(ch)
        if chars:
            rng.shuffle(chars)
            texts.append("".join(ch + rng.choice(["", "", "", " ", "\n"]) for ch in chars))
    for chars in by_script.values():
        words = ["".join(rng.choices(chars, k=rng.randint(1, 12))) for _ in range(40)]
        texts.append(" ".join(words))
        texts.append(rng.choice(["", " "]).join(words) + "\n" + ", ".join(words[:10]) + ".")
    return texts


def hard_texts(specials: list[str]) -> list[str]:
    """Texts built to be hard: special-token strings whole and in part, escaped surrogates, long runs
    of whitespace and digits, contractions in every case, every Unicode script, a text over 1 MB."""
    rng = random.Random(23)
    texts = []
    for s in specials:
        texts += [s, f"a{s}b", f" {s} ", s * 3, f"{s}\n{s}", s[:-1], s[1:], s[:2] + " " + s[2:], f"x{s[:-2]}",
                  s.upper()]
    texts += ["<|", "|>", "<||>", "<|endoftext", "endoftext|>", "< |endoftext| >", "<|endoftext|", "<<|endoftext|>>"]
    texts += ["\\ud800", '"\\udfff\\ud800"', "x\\uD83D\\uDE00y", "\\\\ud800", "\ufffd", "\ufffd" * 50]
    for n in (1, 2, 3, 4, 7, 16, 100, 1000, 5000):
        for unit in (" ", "\n", "\t", "\r\n", " \n", "\u00a0", "\u3000", "\u2028", "\x0b", "\x0c", " \t\n"):
            texts += [unit * n, "a" + unit * n + "b", unit * n + "x", "x" + unit * n]
        texts += ["1" * n, "x" + "0" * n, "".join(rng.choices("0123456789", k=n)), "٣" * n, "１" * n,
                  "." * n, "!" * n, "a" * n, "aA" * n, "'s" * n, "é" * n, "😀" * n, "\u0301" * n]
    texts += [" ".join(str(rng.randint(0, 10 ** rng.randint(1, 30))) for _ in range(300)),
              "3.14159265358979 1,000,000 0x1F 1e-10 12:34:56 2026-12-04 +44 20 7946 0958"]
    for word in ("s", "t", "re", "ve", "m", "ll", "d"):
        for q in ("'", "\u2019"):
            texts += [f"it{q}{word}", f"IT{q}{word.upper()}", f"{q}{word}", f"x {q}{word} y", f"{q}{word.title()}"]
    texts += ["👨‍👩‍👧‍👦 👍🏽 🇫🇷 e\u0301 ﷽ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 Z̤͔ͧ̑̓ä͖̭̈̇lͮ̒ͫǧ̗͚̚o̙̔ͮ̇͐̇", "\x00\x01\x7f\x80\x9f", "ﬁ ﬀ ẞ ß İ ı ǅ"]
    texts.append("".join(chr(rng.randint(0x20, 0x2FFF)) for _ in range(3000)))
    texts += _script_texts(rng)
    words = ["def", "x1", "  ", "\n", "数据", "ÄÖÜ", "42", "\t", "مرحبا"]
    texts.append(" ".join(rng.choice(words) for _ in range(300_000)))  # over 1 MB
    return texts


def check_identity(fast, reference, texts: list[str]) -> int:
    """Ids of every text by the fast engine (the texts it encodes itself, and through encode_texts all
    of them) against the reference's; returns the tokens compared."""
    assert fast.fast is not None and fast.engine == f"gigatoken {fast_engine.FAST_ENGINE_VERSION}"
    assert reference.fast is None
    expected = encode_texts(reference, texts)
    got = encode_texts(fast, texts)
    mine = [t for t in texts if not any(s in t for s in fast.fast.specials)]
    offsets, ids = fast.fast.encode(fast.fast.prepared(mine), 1)
    direct = encode_texts(reference, mine)
    for name, a, b, docs in (("encode_texts", got, expected, texts), ("engine", None, direct, mine)):
        a_off = offsets if a is None else np.asarray(a.offsets)
        a_ids = ids if a is None else np.asarray(a.values)
        b_off, b_ids = np.asarray(b.offsets), np.asarray(b.values)
        if np.array_equal(a_off, b_off) and np.array_equal(a_ids, b_ids):
            continue
        for i in range(len(docs)):
            x, y = a_ids[a_off[i]:a_off[i + 1]], b_ids[b_off[i]:b_off[i + 1]]
            if not np.array_equal(x, y):
                pytest.fail(f"{name}: document {i} ({docs[i][:60]!r}...) differs: {x[:20]} vs {y[:20]}")
    return int(b_off[-1])


@pytest.fixture(scope="module")
def cl100k():
    return load_tokenizer(engine="auto"), load_tokenizer(engine="reference")


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    path = str(llama3_style_tokenizer(tmp_path_factory.mktemp("llama3") / "tokenizer.json"))
    return load_tokenizer(path, engine="auto"), load_tokenizer(path, engine="reference")


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    texts = repo_corpus()[:200]
    path = str(bos_tokenizer(tmp_path_factory.mktemp("gpt2") / "tokenizer.json", texts))
    return load_tokenizer(path, engine="auto"), load_tokenizer(path, engine="reference")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict:
    """The other tokenizer.json shapes people train with (corpora.SHAPES), each both ways."""
    out = {}
    for shape in SHAPES:
        path = str(shaped_tokenizer(tmp_path_factory.mktemp(shape) / "tokenizer.json", shape))
        out[shape] = load_tokenizer(path, engine="auto"), load_tokenizer(path, engine="reference")
    return out


def test_every_proven_tokenizer_is_one_these_tests_compare(cl100k, llama3, gpt2, shapes):
    """The allow-lists hold exactly what the tests below prove: nothing unproven is admitted."""
    enc = __import__("tiktoken").get_encoding(DEFAULT_TOKENIZER)
    assert set(fast_engine._PROVEN_TIKTOKEN) == {hashlib.sha256(tiktoken_ranks(enc)).hexdigest()}
    tested = [llama3, gpt2, *shapes.values()]
    assert set(fast_engine._PROVEN_HF) == {hf_structure(t.fast._load.args[0]) for t, _ in tested}
    assert all(json.loads(t.fast._load.args[0])["normalizer"] is None for t, _ in tested)  # HF's runs first
    assert set(fast_engine._NORMALIZERS) == {(normalizer or {}).get("type") for normalizer, _, _ in SHAPES.values()}


def test_the_known_ids_of_cl100k_are_the_ids_tiktoken_decodes(cl100k):
    """Known ids come from the ranks and special tokens: each is an id tiktoken decodes, and no other."""
    import tiktoken

    tokenizer, _ = cl100k
    enc = tiktoken.get_encoding(tokenizer.name)

    def decodes(i: int) -> bool:
        try:
            enc.decode_single_token_bytes(i)
        except KeyError:
            return False
        return True

    assert tokenizer.known_ids.shape[0] == enc.n_vocab == 100_277
    assert tokenizer.known_ids.tolist() == [decodes(i) for i in range(enc.n_vocab)]
    assert int(tokenizer.known_ids.sum()) == 100_261  # 16 ids of the range are no token


@pytest.mark.parametrize("corpus", ["demo", "repo", "hard"])
def test_cl100k_ids_equal_tiktoken(cl100k, corpus):
    fast, reference = cl100k
    texts = {"demo": demo_corpus, "repo": repo_corpus}.get(corpus, lambda: hard_texts(list(fast.fast.specials)))()
    assert len(texts) > 40
    assert check_identity(fast, reference, texts) > 1000


@pytest.mark.parametrize("corpus", ["demo", "hard"])
def test_llama3_style_tokenizer_json_ids_equal_hf_tokenizers(llama3, corpus):
    fast, reference = llama3
    texts = demo_corpus()[::6] if corpus == "demo" else hard_texts(list(fast.fast.specials) + ["<|endoftext|>"])
    assert check_identity(fast, reference, texts) > 1000


def normalization_texts() -> list[str]:
    """Texts that NFC and NFKC change: every code point with a decomposition (compatibility forms,
    precomposed letters, ligatures, fullwidth and circled forms, Hangul), in runs with words between,
    and letters followed by combining marks in scrambled order (canonical reordering and composition)."""
    decomposable = [chr(c) for c in range(0x30000) if not 0xD800 <= c < 0xE000
                    and unicodedata.decomposition(chr(c))] + [chr(c) for c in range(0xAC00, 0xD7A4, 97)]
    texts = [" word ".join(decomposable[i:i + 40]) for i in range(0, len(decomposable), 40)]
    rng = random.Random(5)
    marks = [chr(c) for c in range(0x300, 0x370)] + ["\u0323", "\u0338", "\u3099", "\u309a"]
    bases = "aeiouAEIOUnNcCsSzZ<>=かはカハ가"
    for _ in range(200):
        texts.append(" ".join(rng.choice(bases) + "".join(rng.sample(marks, rng.randint(1, 4)))
                              for _ in range(rng.randint(20, 80))))
    return texts


@pytest.mark.parametrize("shape", list(SHAPES))
def test_the_other_shapes_ids_equal_hf_tokenizers(shapes, shape):
    """Qwen2's, GPT-NeoX's and Tekken's shapes, and a Llama 3 one with NFKC, id for id with HF tokenizers, on
    this repository, the hard texts and every code point a normalizer changes."""
    fast, reference = shapes[shape]
    texts = repo_corpus()[::15] + hard_texts(list(fast.fast.specials)) + normalization_texts()
    assert check_identity(fast, reference, texts) > 100_000


def test_gpt2_style_tokenizer_json_ids_equal_hf_tokenizers(gpt2):
    fast, reference = gpt2
    texts = repo_corpus()[200::4] + hard_texts(list(fast.fast.specials))
    assert check_identity(fast, reference, texts) > 1000


def test_special_token_strings_are_text_whatever_the_engine(cl100k):
    fast, reference = cl100k
    texts = ["before <|endoftext|> after", "no special here", "<|fim_prefix|>x<|fim_suffix|>"]
    ids = encode_texts(fast, texts).to_pylist()
    assert ids == encode_texts(reference, texts).to_pylist()
    assert all(100257 not in doc and 100258 not in doc for doc in ids)
    assert fast.fast.encode(texts[:1], 1)[1].tolist().count(100257) == 1  # what the routing keeps from happening


@pytest.mark.parametrize("engine", ["auto", "reference"])
def test_a_tokenizer_json_encodes_special_token_strings_as_text(llama3, gpt2, engine):
    """As tiktoken's encode_ordinary: a special token's characters in a text are text tokens, so only the
    BOS and EOS bfpack adds mark a document's bounds (HF tokenizers would match them as special tokens)."""
    for auto, reference in (llama3, gpt2):
        tok = auto if engine == "auto" else reference
        specials = sorted(auto.fast.specials)
        ids = encode_texts(tok, [f"before {s} after" for s in specials]).to_pylist()
        special_ids = {tok.eos_id, tok.bos_id} - {None}
        assert special_ids and not any(set(doc) & special_ids for doc in ids)
        assert ids == encode_texts(reference, [f"before {s} after" for s in specials]).to_pylist()


def test_unproven_tokenizers_use_the_reference(tmp_path):
    other = tmp_path / "tokenizer.json"
    data = json.loads(Path(bos_tokenizer(other, ["some text to train on"] * 20)).read_text())
    data["normalizer"] = {"type": "Lowercase"}
    other.write_text(json.dumps(data))
    tok = load_tokenizer(str(other))
    assert tok.fast is None and tok.engine.startswith("tokenizers ")


def test_the_engine_line_names_the_engine_its_cost_and_why_the_reference(tmp_path):
    from bfpack_spark.config import load_config
    from bfpack_spark.stages.inputs import engine_line

    def line(**settings) -> str:
        return engine_line(load_config(None, {"input.paths": ["x"], "output.output": "y", **settings}))

    fast = line()
    assert fast.startswith(f"tokenizer {DEFAULT_TOKENIZER}: the fast engine (gigatoken 0.10.0) encodes, about 20.0M")
    chosen = line(**{"tokenizer.engine": "reference"})
    assert "the reference engine (tiktoken " in chosen and "why: --tokenizer-engine reference" in chosen
    other = tmp_path / "tokenizer.json"
    data = json.loads(Path(bos_tokenizer(other, ["some text to train on"] * 20)).read_text())
    data["normalizer"] = {"type": "Lowercase"}
    other.write_text(json.dumps(data))
    uncovered = line(**{"tokenizer.tokenizer": str(other)})
    assert "the reference engine (tokenizers " in uncovered and "about 0.4M tokens/s per core" in uncovered
    assert ("why: its shape (normalizer Lowercase, pre-tokenizer ByteLevel, model BPE) is not one the fast engine "
            "is proven on") in uncovered


def test_a_renewed_encoder_gives_the_same_ids(cl100k):
    """Past its memory budget the encoder is dropped after every batch and made anew for the next (as it
    is, in a long run, once its caches have grown past the budget); the ids do not change."""
    fast, reference = cl100k
    encoder = FastEncoder(fast.fast._load, fast.fast.specials, budget=-2**40)  # past it whatever the RSS does
    texts = demo_corpus()[:300]
    assert encoder._backend is None  # made on the first text: a run over token ids never makes one
    made = []
    for part in (texts[:100], texts[100:200], texts[200:]):
        offsets, ids = encoder.encode(part, 1)
        assert np.array_equal(ids, np.asarray(encode_texts(reference, part).values))
        made.append((encoder.renewals, encoder._backend))
    assert made == [(0, None), (1, None), (2, None)]  # each batch by a new encoder, freed past the budget


def test_a_document_with_endoftext_in_its_text_is_packed_as_before(spark, tmp_path):
    """End to end on Spark: the same tables whichever engine runs (the reference is how it was packed
    before), the special token's characters as text, the engine in the stats row, one run id."""
    from bfpack_spark.config import load_config
    from bfpack_spark.io.tables.read import snapshot_dataset
    from bfpack_spark.job import run

    from corpora import write_jsonl

    texts = demo_corpus()[:400]
    texts[7] = "A document that says <|endoftext|> in the middle, and <|endofprompt|> later."
    texts[8] = texts[8][:500] + "<|endoftext|>" + texts[8][500:]
    (tmp_path / "in").mkdir()
    write_jsonl(tmp_path / "in" / "docs.jsonl", [{"id": f"d{i}", "text": t} for i, t in enumerate(texts)])
    tables, results = {}, {}
    for engine in ("auto", "reference"):
        results[engine] = run(load_config(None, {
            "input.paths": [str(tmp_path / "in")], "output.output": str(tmp_path / engine),
            "packing.seq_len": 1024, "tokenizer.engine": engine}), spark)
        tables[engine] = snapshot_dataset(str(tmp_path / engine / "sequences")).to_table().sort_by("seq_id")
    assert tables["auto"].select(["input_ids", "doc_ids", "seg_starts"]).equals(
        tables["reference"].select(["input_ids", "doc_ids", "seg_starts"]))
    assert results["auto"].run_id == results["reference"].run_id
    assert results["auto"].stats["tokenizer_engine"] == f"gigatoken {fast_engine.FAST_ENGINE_VERSION}"
    assert results["reference"].stats["tokenizer_engine"].startswith("tiktoken ")
    enc = __import__("tiktoken").get_encoding(DEFAULT_TOKENIZER)
    for s in tables["auto"].to_pylist():
        if "d7" in s["doc_ids"]:
            pos = sum(s["seg_lengths"][:s["doc_ids"].index("d7")])
            assert s["input_ids"][pos:pos + len(enc.encode_ordinary(texts[7])) + 1] == \
                enc.encode_ordinary(texts[7]) + [enc.eot_token]
            break
    else:
        pytest.fail("d7 is in no sequence")
