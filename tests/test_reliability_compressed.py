"""Silent loss with compressed and damaged inputs, on every reading path of the CSV, Binance
trades and JSON-lines readers.

The promise is the uncompressed one: every data line is a delivered or a refused row, a
refusal does not depend on which path (numba or pyarrow, fast or exact) read the block, and a
compressed stream that is cut off or corrupt is a :class:`DataError` naming the file, never a
shorter read that looks complete. Paths are forced as in ``test_io_binance_fast.py``:
``PLAIN_MIN_BYTES`` 0 sends every block to the numba parser, ``1 << 62`` none.
"""

from __future__ import annotations

import bz2
import gzip
import io
import itertools
import zipfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import zstandard
from test_io_binance_fast import rows

from nautilus_pipeline.errors import DataError
from nautilus_pipeline.io import Replay, Source, binance, detect_format
from nautilus_pipeline.io.chunk import Reason
from nautilus_pipeline.io.csv import MAX_LINE
from nautilus_pipeline.io.files import byte_blocks, unsupported_container

DATA = Path(__file__).resolve().parents[1] / "nautilus_pipeline" / "data"
UM = DATA / "binance-um-btcusdt-trades-20240808.csv"
LINES = UM.read_bytes().split(b"\n")  # header, 21,313 trades, "" after the last newline
ROWS = len(LINES) - 2


def pad_quote_qty(line: bytes, length: int) -> bytes:
    """The line with its quote_qty (a field the replay does not read) padded to ``length`` bytes."""
    f = line.split(b",")
    f[3] = f[3] + b"0" * (length - len(line))
    return b",".join(f)


def write(path: Path, lines: list[bytes], codec: str = "none") -> Path:
    data = b"\n".join(lines)
    path.write_bytes(gzip.compress(data) if codec == "gzip" else data)
    return path


def damaged_trades(tmp_path: Path, lines: list[bytes], codec: str, garbage_elsewhere: bool,
                   refused: set[int]) -> tuple[Path, set[int], list[int]]:
    """``lines`` written as a trades file (gzip or plain), with file line 5002 damaged too
    when ``garbage_elsewhere``: its path, the file lines to be refused, the trade ids kept."""
    lines = list(lines)
    if garbage_elsewhere:
        lines[5001] = b"garbage"  # file line 5002
        refused = refused | {5002}
    path = write(tmp_path / ("BTCUSDT-trades-2024-08-08.csv" + (".gz" if codec == "gzip" else "")), lines, codec)
    want = [int(ln.split(b",")[0]) for i, ln in enumerate(LINES[1:-1], start=2) if i not in refused]
    return path, refused, want


# --- lines longer than MAX_LINE -------------------------------------------------------
@pytest.mark.parametrize("codec", ["none", "gzip"])
@pytest.mark.parametrize("garbage_elsewhere", [False, True])
def test_a_line_over_max_line_is_refused_on_every_path(tmp_path: Path, codec: str, garbage_elsewhere: bool) -> None:
    """A line of MAX_LINE + 1 bytes is a refused row, one of MAX_LINE bytes a row, whichever
    path reads the block: the numba parser took any length and pyarrow's fast parse lines of
    up to a few MiB, so such a line was delivered in a clean file and refused (by the exact
    path) when another line of its block was damaged."""
    lines = list(LINES)
    lines[101] = pad_quote_qty(lines[101], MAX_LINE + 1)  # file line 102
    lines[201] = pad_quote_qty(lines[201], MAX_LINE)  # file line 202: at the limit, read
    path, _, want = damaged_trades(tmp_path, lines, codec, garbage_elsewhere, {102})
    got = []
    for fast in (True, False):
        for block in (None, 65_536):  # one block, or a later one after blocks delivered
            cols, dropped, _, _ = rows(path, fast, block=block)
            assert cols["trade_id"].tolist() == want
            assert [(d[0], d[1]) for d in dropped if d[0] == 102] == [(102, Reason.UNPARSABLE)]
            assert f"{MAX_LINE + 1:,} bytes" in next(d[3] for d in dropped if d[0] == 102)
            got.append([(d[0], d[1], d[3]) for d in dropped])
    assert all(g == got[0] for g in got)


def test_a_line_over_max_line_is_counted_as_refused_by_the_replay(tmp_path: Path) -> None:
    lines = list(LINES)
    lines[101] = pad_quote_qty(lines[101], 3 * MAX_LINE)
    path = write(tmp_path / "BTCUSDT-trades-2024-08-08.csv", lines)
    for fast in (True, False):
        with mock.patch.object(binance, "PLAIN_MIN_BYTES", 0 if fast else 1 << 62):
            replay = Replay([Source(path, policy="reject")])
            delivered = sum(len(b["ts_ns"]) for b in replay.iter_arrays(4096))
        replay.accounting.check()
        t = replay.accounting.total
        assert (t.read, delivered, t.rejected) == (ROWS, ROWS - 1, 1)
        assert dict(replay.accounting.sources[str(path)].by_reason) == {"unparsable": 1}


# --- bytes that are not UTF-8 ---------------------------------------------------------
@pytest.mark.parametrize("codec", ["none", "gzip"])
@pytest.mark.parametrize("garbage_elsewhere", [False, True])
def test_a_byte_that_is_not_utf8_refuses_its_row_only_in_a_field_that_is_read(tmp_path: Path, codec: str,
                                                                              garbage_elsewhere: bool) -> None:
    """A flipped high bit in quote_qty (not read) costs no row, in price it refuses the row,
    whichever path reads the block: the exact path refused both, so the first row was
    delivered in a clean block and refused once another line of its block was damaged."""
    lines = list(LINES)
    f = lines[101].split(b",")
    lines[101] = b",".join([*f[:3], f[3][:2] + b"\xff" + f[3][2:], *f[4:]])  # file line 102: quote_qty
    f = lines[301].split(b",")
    lines[301] = b",".join([f[0], f[1][:2] + b"\xb1" + f[1][3:], *f[2:]])  # file line 302: price
    path, refused, want = damaged_trades(tmp_path, lines, codec, garbage_elsewhere, {302})
    got = []
    for fast in (True, False):
        cols, dropped, _, _ = rows(path, fast)
        assert cols["trade_id"].tolist() == want
        assert sorted(d[0] for d in dropped) == sorted(refused)
        assert [d[1] for d in dropped if d[0] == 302] == [Reason.UNPARSABLE]
        got.append(dropped)
    assert repr(got[0]) == repr(got[1])


# --- compressed streams -----------------------------------------------------------------
RAW = UM.read_bytes()
FEED = gzip.decompress((DATA / "binance-feed-spot-ethusdt_20240808.jsonl.gz").read_bytes())


def pzstd(data: bytes, frame: int) -> bytes:
    """``data`` as pzstd writes it: frames of ``frame`` input bytes, each after a skippable
    frame (magic 0x184D2A50, 4 bytes) holding the compressed frame's size."""
    out = b""
    for i in range(0, len(data), frame):
        z = zstandard.ZstdCompressor().compress(data[i : i + frame])
        out += b"\x50\x2a\x4d\x18\x04\x00\x00\x00" + len(z).to_bytes(4, "little") + z
    return out


def read(path: Path, fmt: str, fast: bool = True) -> tuple[int, int, int]:
    """(delivered, read, refused) of a replay of ``path`` under ``reject``."""
    with mock.patch.object(binance, "PLAIN_MIN_BYTES", 0 if fast else 1 << 62):
        replay = Replay([Source(path, format=fmt, policy="reject", symbol="BTCUSDT")])
        delivered = sum(len(b["ts_ns"]) for b in replay.iter_arrays(4096))
    replay.accounting.check()
    t = replay.accounting.total
    return delivered, t.read, t.rejected


@pytest.mark.parametrize("fast", [True, False])
def test_a_pzstd_file_reads_like_the_plain_one(tmp_path: Path, fast: bool) -> None:
    """pzstd (zstd's parallel compressor) starts the file with a skippable frame: it was not
    recognised as zstd, read as text, and refused with its compressed bytes shown as a row."""
    path = tmp_path / "BTCUSDT-trades-2024-08-08.csv.zst"
    path.write_bytes(pzstd(RAW, 300_000))
    assert detect_format(path) == "binance_trades"
    assert read(path, "binance_trades", fast) == (ROWS, ROWS, 0)
    assert b"".join(byte_blocks(path)) == RAW
    feed = tmp_path / "feed.jsonl.zst"
    feed.write_bytes(pzstd(FEED, 1 << 20))
    assert read(feed, "binance_feed") == read(DATA / "binance-feed-spot-ethusdt_20240808.jsonl.gz", "binance_feed")


def test_a_pzstd_file_cut_just_after_a_frames_announcement_is_truncated(tmp_path: Path) -> None:
    """Cut 12 bytes into a pzstd frame pair (its skippable frame whole, the zstd frame not
    begun), the codec sees a whole, valid stream of the frames before: a silent short read.
    The announced size says the file is truncated, on every reader."""
    for fmt, raw, name in (("binance_trades", RAW, "BTCUSDT-trades-2024-08-08.csv.zst"),
                           ("binance_feed", FEED, "feed.jsonl.zst")):
        data = pzstd(raw, 300_000)
        second = 12 + int.from_bytes(data[8:12], "little")  # where the second pair starts
        path = tmp_path / name
        for cut in (second + 12, second + 13, len(data) - 1):
            path.write_bytes(data[:cut])
            for fast in (True, False):
                with pytest.raises(DataError, match=rf"{name}: the compressed file is truncated"):
                    read(path, fmt, fast)
            with pytest.raises(DataError, match="truncated"):
                b"".join(byte_blocks(path))
        path.write_bytes(data[:second])  # at a frame boundary: a valid file of the first frame
        assert b"".join(byte_blocks(path)) == raw[:300_000]


def test_an_lz4_frame_after_a_skippable_frame_is_named(tmp_path: Path) -> None:
    path = tmp_path / "ticks.csv.lz4"
    path.write_bytes(b"\x5a\x2a\x4d\x18\x02\x00\x00\x00ab\x04\x22\x4d\x18\x64\x40\xa7" + b"\x00" * 16)
    assert unsupported_container(path) == "lz4 frame"


def _compress(codec: str, data: bytes) -> bytes:
    if codec == "zip":
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("BTCUSDT-trades-2024-08-08.csv", data)
        return buf.getvalue()
    return {"gzip": gzip.compress, "zstd": zstandard.ZstdCompressor().compress, "bz2": bz2.compress}[codec](data)


@pytest.mark.parametrize("codec", ["gzip", "zstd", "bz2", "zip"])
@pytest.mark.parametrize("fmt", ["binance_trades", "jsonl", "binance_feed"])
def test_an_empty_compressed_file_says_it_holds_no_data(tmp_path: Path, codec: str, fmt: str) -> None:
    """(It said "the file has a header but no rows", or "only blank lines".)"""
    path = tmp_path / "BTCUSDT-trades-2024-08-08.csv.x"
    path.write_bytes(_compress(codec, b""))
    with pytest.raises(DataError, match=rf"x: the {codec} file holds no data \(it decompresses to 0 bytes\)"):
        read(path, fmt)


def _damaged(codec: str, raw: bytes, damage: str) -> bytes:
    """``raw`` compressed with ``codec`` and damaged: cut mid-stream, in the last 8 bytes (the
    gzip trailer, zstd's last block, bzip2's end-of-stream), one byte flipped mid-stream, or
    a second member/frame/stream that is cut."""
    whole = _compress(codec, raw)
    if damage == "cut_middle":
        return whole[: len(whole) // 2]
    if damage == "cut_trailer":
        return whole[:-5]
    if damage == "flip":
        b = bytearray(whole)
        b[len(b) // 2] ^= 0x04
        return bytes(b)
    half = raw.index(b"\n", len(raw) // 2) + 1  # two members/frames/streams, the second cut
    second = _compress(codec, raw[half:])
    return _compress(codec, raw[:half]) + second[: len(second) // 2]


@pytest.mark.parametrize("codec", ["gzip", "zstd", "bz2"])
@pytest.mark.parametrize("damage", ["cut_middle", "cut_trailer", "flip", "second_cut"])
@pytest.mark.parametrize(("fmt", "fast"), [("binance_trades", True), ("binance_trades", False), ("binance_feed", False)])
def test_a_damaged_compressed_stream_is_a_data_error_naming_the_file(tmp_path: Path, codec: str, damage: str,
                                                                     fmt: str, fast: bool) -> None:
    """Never a shorter read that looks complete (zstd frames here carry a checksum, as the
    zstd tool writes them: without one a flipped byte can decode to other digits, unseen)."""
    raw, name = (RAW, "BTCUSDT-trades-2024-08-08.csv.x") if fmt == "binance_trades" else (FEED, "feed.jsonl.x")
    if codec == "zstd" and damage == "flip":
        data = bytearray(zstandard.ZstdCompressor(write_checksum=True).compress(raw))
        data[len(data) // 2] ^= 0x04
    else:
        data = _damaged(codec, raw, damage)
    path = tmp_path / name
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"{name}: the compressed file is truncated or corrupt"):
        read(path, fmt, fast)


@pytest.mark.parametrize(("codec", "layout"), [(c, "crlf_bom_no_last_newline") for c in ("gzip", "zstd", "bz2", "zip")]
                         + [(c, "members_cut_mid_line") for c in ("gzip", "zstd", "bz2")])
def test_compressed_layouts_read_like_the_plain_file_on_every_path(tmp_path: Path, codec: str, layout: str) -> None:
    """A BOM, CRLF line ends and no newline after the last line; or the stream made of
    members (gzip), frames (zstd), streams (bz2) cut inside lines, read in small blocks."""
    if layout == "crlf_bom_no_last_newline":
        data = _compress(codec, b"\xef\xbb\xbf" + RAW.replace(b"\n", b"\r\n").rstrip(b"\r\n"))
    else:
        cuts = [0, 1000, 333_333, 333_340, 800_001, len(RAW)]
        data = b"".join(_compress(codec, RAW[a:b]) for a, b in itertools.pairwise(cuts))
    path = tmp_path / "BTCUSDT-trades-2024-08-08.csv.x"
    path.write_bytes(data)
    want = rows(UM, False)
    for fast in (True, False):
        for block in (None, 65_536):
            got = rows(path, fast, block=block)
            for k in want[0]:
                assert np.array_equal(got[0][k], want[0][k]), (k, fast, block)
            assert repr(got[1:3]) == repr(want[1:3])
