"""Readers without Spark: splits, damaged files, every record accounted for."""

import gzip
import json

import pytest
import zstandard

from bfpack_spark.io.formats import inflate, jsonl, read_split
from bfpack_spark.io.formats.base import Fields, Limits, Split, reason_code
from bfpack_spark.io.formats.fetch import Opened


def split_of(path, fmt="jsonl", compression=None, byte_range=None) -> Split:
    return Split(str(path), path.name, fmt, path.stat().st_size, compression, byte_range)


def read(split, id_column, column, tokenized, limits):
    """Every batch of one split."""
    return list(read_split(split, Fields(column, tokenized, id_column, None, limits)))


def lines_of(path, size, n_splits, max_bytes=10**9, monkeypatch=None):
    step = -(-size // n_splits)
    out = []
    for s in range(0, size, step):
        out.extend(jsonl.lines(Opened(split_of(path, byte_range=(s, min(s + step, size)))), max_bytes))
    return [(at, None if isinstance(line, jsonl.LineHead) else line) for at, line in out]


@pytest.mark.parametrize("block", [7, 64, 8 * 2**20])
@pytest.mark.parametrize("n_splits", [1, 2, 3, 7, 50])
def test_every_line_belongs_to_exactly_one_split(tmp_path, monkeypatch, block, n_splits):
    monkeypatch.setattr(jsonl, "BLOCK_BYTES", block)
    rows = ['{"id": "a"}', "x" * 300, "", '{"id": "b"}', "y" * 5, "z" * 90, '{"id": "c"}']
    data = ("\n".join(rows) + "\n").encode()
    path = tmp_path / "f.jsonl"
    path.write_bytes(data)
    expected, at = [], 0
    for r in rows:
        expected.append((at, r.encode() if len(r) <= 100 else None))
        at += len(r) + 1
    assert lines_of(path, len(data), n_splits, max_bytes=100) == expected


def test_last_line_without_newline_and_long_lines(tmp_path, monkeypatch):
    monkeypatch.setattr(jsonl, "BLOCK_BYTES", 16)
    path = tmp_path / "f.jsonl"
    path.write_bytes(b"short\n" + b"L" * 200 + b"\nafter\nend")
    assert lines_of(path, path.stat().st_size, 4, max_bytes=50) == [
        (0, b"short"), (6, None), (207, b"after"), (213, b"end")]


def jsonl_bytes(n, start=0):
    return "".join(json.dumps({"id": f"d{i}", "text": f"text {i}"}) + "\n" for i in range(start, start + n)).encode()


def read_all(path, compression):
    batches = read(split_of(path, "jsonl", compression), "id", "text", False, Limits(10**6))
    return [d for b in batches for d in b.ids.to_pylist()], [r.reason for b in batches for r in b.rejects], \
        sum(b.n_records for b in batches)


def test_gzip_damage_keeps_what_came_before(tmp_path):
    good = gzip.compress(jsonl_bytes(2000))
    (tmp_path / "t.jsonl.gz").write_bytes(good[: len(good) // 2])
    ids, reasons, n = read_all(tmp_path / "t.jsonl.gz", "gzip")
    assert len(ids) > 500 and ids == [f"d{i}" for i in range(len(ids))]
    assert reasons[-1].startswith("corrupt or truncated gzip file")
    assert n == len(ids) + len(reasons)


def test_gzip_members_and_zero_padding(tmp_path):
    data = gzip.compress(jsonl_bytes(3)) + gzip.compress(jsonl_bytes(2, 3)) + b"\0" * 512
    (tmp_path / "p.jsonl.gz").write_bytes(data)
    ids, reasons, _ = read_all(tmp_path / "p.jsonl.gz", "gzip")
    assert ids == ["d0", "d1", "d2", "d3", "d4"] and reasons == []


def test_zstd_frames_and_garbage(tmp_path):
    c = zstandard.ZstdCompressor()
    (tmp_path / "z.jsonl.zst").write_bytes(c.compress(jsonl_bytes(2)) + c.compress(jsonl_bytes(1, 2)))
    assert read_all(tmp_path / "z.jsonl.zst", "zstd")[:2] == (["d0", "d1", "d2"], [])
    (tmp_path / "g.jsonl.zst").write_bytes(c.compress(jsonl_bytes(3)) + b"garbage that is not zstd")
    ids, reasons, _ = read_all(tmp_path / "g.jsonl.zst", "zstd")
    assert ids == ["d0", "d1", "d2"] and reasons[0].startswith("corrupt or truncated zstd file")


def test_globs_mean_the_same_on_uris_as_on_local_paths(tmp_path):
    from bfpack_spark.io.listing.listing import glob_regex, list_inputs

    (tmp_path / "sub" / "deep").mkdir(parents=True)
    for rel in ("a.jsonl", "b.jsonl", "sub/c.jsonl", "sub/deep/d.jsonl"):
        (tmp_path / rel).write_text('{"text": "x"}\n')
    for pattern in ("*.jsonl", "**/*.jsonl", "sub/*.jsonl", "[ab].jsonl"):
        local = list_inputs([f"{tmp_path}/{pattern}"]).column("source")
        uri = list_inputs([f"file://{tmp_path}/{pattern}"]).column("source")
        assert local == uri, pattern
    assert list_inputs([f"file://{tmp_path}/*.jsonl"]).column("source") == ["a.jsonl", "b.jsonl"]
    assert glob_regex("**/*.jsonl").fullmatch("x.jsonl") and not glob_regex("*.jsonl").fullmatch("s/x.jsonl")


def test_ids_are_decided_per_file_however_it_is_split(tmp_path):
    from bfpack_spark.io.listing.listing import list_inputs
    from bfpack_spark.io.listing.plan import plan_groups

    lines = [json.dumps({"id": f"d{i}", "text": "t" * 50}) for i in range(200)]
    lines[150] = json.dumps({"text": "this one lost its id"})
    (tmp_path / "ids.jsonl").write_text("\n".join(lines) + "\n")
    plan = plan_groups(list_inputs([str(tmp_path / "ids.jsonl")]), "text", tokenized=False, seq_len=2048,
                       target_items=1, min_groups=8)
    splits = [s for g in plan.groups for s in g]
    assert len(splits) > 1 and all(s.byte_range for s in splits)
    batches = [b for s in splits for b in read(s, "id", "text", False, Limits(10**6))]
    ids = [d for b in batches for d in b.ids.to_pylist()]
    assert ids == [f"d{i}" for i in range(200) if i != 150]
    assert [r.reason for b in batches for r in b.rejects] == ["id field 'id' is missing"]


def test_a_damaged_parquet_row_group_rejects_its_rows_and_no_others(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "f.parquet"
    texts = [f"document {i} " + "word " * 50 for i in range(300)]
    pq.write_table(pa.table({"id": [str(i) for i in range(300)], "text": texts}), path,
                   row_group_size=100, compression="zstd")
    meta = pq.ParquetFile(path).metadata
    second = meta.row_group(1).column(1)  # the text column chunk of row group 1
    data = bytearray(path.read_bytes())
    start = second.dictionary_page_offset or second.data_page_offset
    data[start:start + second.total_compressed_size] = b"\xff" * second.total_compressed_size
    path.write_bytes(bytes(data))
    batches = read(split_of(path, "parquet"), "id", "text", False, Limits(10**9))
    docs = [t for b in batches for t in b.texts]
    rejects = [r for b in batches for r in b.rejects]
    assert docs == texts[:100] + texts[200:]
    assert [r.row for r in rejects] == list(range(100, 200))
    assert all("unreadable Parquet data in row group 1 (rows 100-199)" in r.reason for r in rejects)
    assert sum(b.n_records for b in batches) == 300


@pytest.mark.parametrize("piece", [512, 2**16])
@pytest.mark.parametrize("codec", ["gzip", "zstd"])
def test_a_bad_checksum_keeps_every_line_that_decodes(tmp_path, monkeypatch, codec, piece):
    """The checksum is only seen at the end: the decoder drops what it decoded in that call."""
    monkeypatch.setattr(inflate, "COMPRESSED_BLOCK_BYTES", piece)
    data = jsonl_bytes(3000)
    if codec == "gzip":
        damaged = bytearray(gzip.compress(data))
        damaged[-8] ^= 0xFF  # the CRC32 of the member
    else:
        damaged = bytearray(zstandard.ZstdCompressor(write_checksum=True).compress(data))
        damaged[-1] ^= 0xFF
    path = tmp_path / f"c.jsonl.{'gz' if codec == 'gzip' else 'zst'}"
    path.write_bytes(bytes(damaged))
    ids, reasons, n = read_all(path, codec)
    assert ids == [f"d{i}" for i in range(3000)]
    assert len(reasons) == 1 and reasons[0].startswith(f"corrupt or truncated {codec} file")
    assert n == 3001


def test_damage_inside_a_zstd_frame_keeps_the_lines_before_it(tmp_path, monkeypatch):
    monkeypatch.setattr(inflate, "COMPRESSED_BLOCK_BYTES", 1024)
    data = bytearray(zstandard.ZstdCompressor(write_checksum=True).compress(jsonl_bytes(20000)))
    data[len(data) * 3 // 10] ^= 0xFF
    (tmp_path / "m.jsonl.zst").write_bytes(bytes(data))
    ids, reasons, n = read_all(tmp_path / "m.jsonl.zst", "zstd")
    # one flipped byte garbles a few lines of its block; the rest of the frame decodes intact
    assert sum(x == f"d{i}" for i, x in enumerate(ids)) >= 19_900
    assert len(ids) <= 20_000 and ids[-1] == "d19999"  # nothing handed out twice, nothing cut off
    assert reasons[-1].startswith("corrupt or truncated zstd file") and n == len(ids) + len(reasons)


def test_a_byte_order_mark_and_an_oversized_line(tmp_path):
    path = tmp_path / "b.jsonl"
    big = json.dumps({"id": "big", "text": "x" * 5000})
    path.write_bytes(b"\xef\xbb\xbf" + jsonl_bytes(2) + big.encode() + b"\n")
    batches = read(split_of(path), "id", "text", False, Limits(1000, 2000))
    assert [i for b in batches for i in b.ids.to_pylist()] == ["d0", "d1"]
    [reject] = [r for b in batches for r in b.rejects]
    assert "larger than max_line_bytes" in reject.reason and reject.excerpt.startswith('{"id": "big"')
    assert reject.doc_id == "big" and reason_code(reject.reason) == "line_too_large"
    assert reject.row == 3 + len(jsonl_bytes(2))  # offsets count the mark's bytes


def test_max_document_bytes_measures_the_text_not_the_line(tmp_path):
    path = tmp_path / "m.jsonl"
    lines = [{"id": "meta", "text": "short", "meta": "m" * 5000},  # a long line, a short text
             {"id": "wide", "text": "\u00e9" * 600},  # 600 characters, 1,200 bytes of UTF-8
             {"id": "fits", "text": "e" * 1000}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))  # \u escapes: each line longer than its text
    [batch] = read(split_of(path), "id", "text", False, Limits(1000, 10_000))
    assert batch.ids.to_pylist() == ["meta", "fits"]
    [reject] = batch.rejects
    assert reject.doc_id == "wide" and reason_code(reject.reason) == "too_large"
    assert "1,000 bytes of UTF-8 text" in reject.reason


def test_gzip_padding_right_after_a_piece_boundary(tmp_path, monkeypatch):
    member = gzip.compress(jsonl_bytes(50))
    monkeypatch.setattr(inflate, "COMPRESSED_BLOCK_BYTES", len(member))  # the member ends a piece
    (tmp_path / "p.jsonl.gz").write_bytes(member + b"\0" * 100)
    ids, reasons, _ = read_all(tmp_path / "p.jsonl.gz", "gzip")
    assert ids == [f"d{i}" for i in range(50)] and reasons == []


def test_a_parquet_file_planned_without_its_footer_is_still_checked_for_the_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["a", "b"], "body": ["x", "y"]}), tmp_path / "f.parquet")
    [batch] = read(split_of(tmp_path / "f.parquet", "parquet"), "id", "text", False, Limits(10**9))
    assert [r.row for r in batch.rejects] == [0, 1] and batch.n_records == 2
    assert "text column 'text' is missing in this file" in batch.rejects[0].reason
    assert reason_code(batch.rejects[0].reason) == "missing_text"


def test_parquet_and_text_file_rejects_keep_the_start_of_what_was_wrong(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["big", "ok"], "text": ["x" * 5000, "fine"]}), tmp_path / "p.parquet")
    [batch] = read(split_of(tmp_path / "p.parquet", "parquet"), "id", "text", False, Limits(1000))
    [reject] = batch.rejects
    assert reject.doc_id == "big" and reject.excerpt == "x" * 160 + "..." and batch.ids.to_pylist() == ["ok"]
    (tmp_path / "t.txt").write_text("y" * 5000)
    [batch] = read(split_of(tmp_path / "t.txt", "text"), None, "text", False, Limits(1000))
    assert batch.rejects[0].excerpt.startswith("yyyy") and reason_code(batch.rejects[0].reason) == "too_large"


def test_ids_that_are_not_valid_unicode_are_rejects_with_their_reason(tmp_path):
    """A Parquet id that is not UTF-8 and a JSON id holding an unpaired surrogate cannot be stored as
    strings: their rows are rejects that say why, and the rows beside them are read."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = b"okbad\xff\xfeok2"
    ids = pa.Array.from_buffers(pa.string(), 3, [None, pa.py_buffer(np.array([0, 2, 7, 10], np.int32)),
                                                pa.py_buffer(data)])
    pq.write_table(pa.table({"id": ids, "text": ["a", "b", ""]}), tmp_path / "u.parquet")
    [batch] = read(split_of(tmp_path / "u.parquet", "parquet"), "id", "text", False, Limits(10**9))
    assert batch.ids.to_pylist() == ["ok", "ok2"] and batch.rows.tolist() == [0, 2]
    [reject] = batch.rejects
    assert reject.row == 1 and reject.doc_id is None
    assert "invalid UTF-8 at byte 3 of the id column 'id'" in reject.reason
    batch.ids.validate(full=True)

    (tmp_path / "s.jsonl").write_text('{"id": "a", "text": "x"}\n{"id": "\\ud800", "text": "y"}\n')
    [batch] = read(split_of(tmp_path / "s.jsonl"), "id", "text", False, Limits(10**6))
    assert batch.ids.to_pylist() == ["a"] and batch.texts == ["x"]
    assert [r.reason for r in batch.rejects] == ["id field 'id' holds an unpaired surrogate escape (invalid Unicode)"]


def _odd_compressed_files(tmp_path) -> list:
    """Small compressed files the one-call decoding must leave to the salvage decoder, and plain ones."""
    c, checked = zstandard.ZstdCompressor(), zstandard.ZstdCompressor(write_checksum=True)
    bad_crc = bytearray(gzip.compress(jsonl_bytes(300)))
    bad_crc[-8] ^= 0xFF
    bad_frame = bytearray(checked.compress(jsonl_bytes(300)))
    bad_frame[-1] ^= 0xFF
    streamed = zstandard.ZstdCompressor().compressobj()  # a frame that does not write its size down
    files = {
        "plain.jsonl.gz": gzip.compress(jsonl_bytes(5)),
        "half.jsonl.gz": gzip.compress(jsonl_bytes(2000))[:3000],
        "members.jsonl.gz": gzip.compress(jsonl_bytes(3)) + gzip.compress(jsonl_bytes(2, 3)) + b"\0" * 512,
        "crc.jsonl.gz": bytes(bad_crc),
        "plain.jsonl.zst": c.compress(jsonl_bytes(4)),
        "frames.jsonl.zst": c.compress(jsonl_bytes(2)) + c.compress(jsonl_bytes(1, 2)),
        "garbage.jsonl.zst": c.compress(jsonl_bytes(3)) + b"garbage that is not zstd",
        "checksum.jsonl.zst": bytes(bad_frame),
        "unsized.jsonl.zst": streamed.compress(jsonl_bytes(6)) + streamed.flush(),
    }
    paths = []
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        paths.append(tmp_path / name)
    return paths


def test_small_files_read_whole_give_what_the_streamed_reader_gives(tmp_path):
    """A task reads small files whole and decodes a clean one in one call, and hands out the documents of
    consecutive files together: each file's documents, rows and rejects are those of reading it alone,
    damaged and multi-member files included, in file order with their own sources."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bfpack_spark.io.formats import read_group_splits

    paths = _odd_compressed_files(tmp_path)
    pq.write_table(pa.table({"id": ["p0", "p1"], "text": ["a", "b"]}), tmp_path / "mid.parquet")
    paths.insert(4, tmp_path / "mid.parquet")
    splits = [split_of(p, "parquet") if p.suffix == ".parquet" else
              split_of(p, "jsonl", "gzip" if p.suffix == ".gz" else "zstd") for p in paths]
    fields = Fields("text", False, "id", None, Limits(10**6))
    alone = [b for s in splits for b in read_split(s, fields)]
    together = list(read_group_splits(splits, fields))
    assert len(together) < len(alone)  # small files are handed out together

    def documents(batches):
        return [(s, r, i, t) for b in batches
                for s, r, i, t in zip(b.sources.to_pylist(), b.rows.tolist(), b.ids.to_pylist(), b.texts)]

    def rejects(batches):
        return [(r.source, r.row, r.reason, r.doc_id) for b in batches for r in b.rejects]

    assert documents(together) == documents(alone) and len(documents(alone)) > 1000
    assert sorted(rejects(together)) == sorted(rejects(alone)) and len(rejects(alone)) >= 4
    assert sum(b.n_records for b in together) == sum(b.n_records for b in alone)
    assert {s for s, *_ in documents(together)} == {p.name for p in paths}  # every file gave documents


@pytest.mark.parametrize("codec, suffix", [("gzip", "gz"), ("zstd", "zst")])
def test_an_empty_compressed_file_is_a_reject(tmp_path, codec, suffix):
    """A compressed file of 0 bytes holds not even a header (a write cut at its start): one reject that
    says so, read alone or among small files read whole."""
    from bfpack_spark.io.formats import read_group_splits

    (tmp_path / f"e.jsonl.{suffix}").write_bytes(b"")
    ids, reasons, n = read_all(tmp_path / f"e.jsonl.{suffix}", codec)
    assert ids == [] and n == 1 and len(reasons) == 1
    assert reasons[0].startswith(f"corrupt or truncated {codec} file") and "the file is empty (0 bytes)" in reasons[0]
    fields = Fields("text", False, "id", None, Limits(10**6))
    [batch] = read_group_splits([split_of(tmp_path / f"e.jsonl.{suffix}", "jsonl", codec)], fields)
    assert [r.reason for r in batch.rejects] == reasons and reason_code(reasons[0]) == "corrupt_file"
