"""The salvage decoder: a gzip or zstd stream decoded incrementally, every byte that decodes before
the damage of a corrupt or truncated file handed out before the error. The JSON-lines reader
(:mod:`.jsonl`) reads compressed files through it, so a damaged file costs only what follows the damage.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from typing import Any

import zstandard

#: compressed bytes fed to the decoder at a time
COMPRESSED_BLOCK_BYTES = 2**16


#: a small file read whole is decoded in one call when it decodes to at most this many bytes
WHOLE_DECODED_BYTES = 64 * 2**20


def _decoder(codec: str):
    """A fresh incremental decoder of one gzip member or zstd frame."""
    if codec == "gzip":
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    return zstandard.ZstdDecompressor().decompressobj()


def inflate_whole(data: bytes, codec: str) -> bytes | None:
    """A whole compressed file decoded in one call: the common case of a small file (one gzip member or
    zstd frame, undamaged), without :class:`Inflated`'s incremental set-up. None where that is not the
    case (several members, damage, or more than :data:`WHOLE_DECODED_BYTES`): the caller streams it."""
    try:
        decoder = _decoder(codec)
        if codec == "gzip":
            out = decoder.decompress(data, WHOLE_DECODED_BYTES)
            whole = decoder.eof and not decoder.unused_data and not decoder.unconsumed_tail
        else:
            if not 0 <= zstandard.frame_content_size(data) <= WHOLE_DECODED_BYTES:  # -1: not written down
                return None
            out = decoder.decompress(data)
            whole = decoder.eof and not decoder.unused_data
    except (zlib.error, zstandard.ZstdError):
        return None
    return out if whole else None


class Corrupt(Exception):
    """A file that cannot be read on from ``offset`` (decoded bytes): damaged, truncated or unreadable."""

    def __init__(self, offset: int, message: str):
        super().__init__(message)
        self.offset = offset


class Inflated:
    """``read()`` over a gzip or zstd stream, decoded incrementally: every byte that decodes
    before the damage of a corrupt or truncated file is handed out, the error comes on the next
    call. Concatenated gzip members and zstd frames are read one after the other; zero bytes
    padding the end of a gzip file (as some tools write) end it.

    A decoder that fails drops what it decoded in the failing call, which may hold whole
    valid lines (a bad checksum is only seen at the end of a frame). So the file is decoded
    again up to the failing piece and through it one byte at a time, to hand out all of that.
    """

    def __init__(self, open_raw: Callable[[], Any], codec: str):
        self.open_raw, self.codec = open_raw, codec
        self.raw = open_raw()
        self.blocks = self._decode(self.raw, COMPRESSED_BLOCK_BYTES)
        self.piece_at = 0      # compressed offset of the piece the decoder was last fed
        self.in_decoder = False
        self.handed = 0        # decoded bytes handed out
        self.error: Exception | None = None

    def _decode(self, raw, piece: int, careful_from: int | None = None) -> Iterator[bytes]:
        """Decoded blocks of the whole stream; from compressed offset ``careful_from`` on, the
        input is fed one byte at a time."""
        careful = careful_from if careful_from is not None else -1  # -1: never
        track = careful < 0
        decoder, fed, padding, ended, pos = _decoder(self.codec), False, False, False, 0
        while True:
            size = piece if track or pos + piece <= careful else max(1, careful - pos)
            chunk = raw.read(size)
            if not chunk:
                if fed:
                    raise EOFError("the file ends inside a compressed block (truncated)")
                if not pos:  # not even a header: a write that never happened, or was cut at its start
                    raise EOFError(f"the file is empty (0 bytes), not a {self.codec} stream")
                return
            if track:
                self.piece_at = pos
            pos += len(chunk)
            if padding:
                if chunk.strip(b"\0"):
                    raise ValueError("data after the zero padding that ends the file")
                continue
            while chunk:
                if self.codec == "gzip" and ended and not fed and not chunk.strip(b"\0"):
                    padding = True  # zero bytes after a complete member end the file
                    break
                self.in_decoder = track
                out = decoder.decompress(chunk)
                self.in_decoder, fed = False, True
                if out:
                    yield out
                if not decoder.eof:
                    break
                chunk, decoder, fed, ended = decoder.unused_data, _decoder(self.codec), False, True

    def _salvage(self) -> bytes:
        """What decodes between the bytes handed out and the decoder's failure."""
        out, skip = bytearray(), self.handed
        raw = self.open_raw()
        try:
            for block in self._decode(raw, COMPRESSED_BLOCK_BYTES, careful_from=self.piece_at):
                out += block[skip:]
                skip = max(0, skip - len(block))
        except Exception:  # the same failure, now after every byte that could be decoded
            pass
        finally:
            raw.close()
        return bytes(out)

    def read(self, n: int = -1) -> bytes:
        """The next decoded block (of any size)."""
        if self.error is not None:
            raise self.error
        try:
            block = next(self.blocks, b"")
        except Exception as exc:
            self.error = exc
            block = self._salvage() if self.in_decoder else b""
            if not block:
                raise
        self.handed += len(block)
        return block

    def close(self) -> None:
        self.raw.close()
