"""One bad row is one bad row: a damaged line never refuses the whole file (issue 12, 5-6).

Damaged copies of the bundled Binance trades: a byte that is not UTF-8 in a mapped column, a
10 MB line, both with a wrong field count, a blank first line; and the file re-encoded
(UTF-16 is refused up front saying so; a UTF-8 byte-order mark reads like the plain file).
"""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nautilus_pipeline.errors import DataError
from nautilus_pipeline.io import Replay, Source

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "nautilus_pipeline" / "data"
BINANCE = DATA / "binance-um-btcusdt-trades-20240808.csv"
LINES = BINANCE.read_bytes().split(b"\n")[:3001]  # header + 3000 trades


def read(path: Path, fmt: str = "binance_trades", policy: str = "reject", **kw) -> tuple[list[int], Replay]:
    r = Replay([Source(path, format=fmt, policy=policy, **kw)])
    ids = [int(x) for b in r.iter_arrays() for x in b["trade_id"]]
    return ids, r


def ids_without(*lines: int) -> list[int]:
    return [int(ln.split(b",")[0]) for i, ln in enumerate(LINES[1:], start=2) if i not in lines]


def write(tmp_path: Path, lines: list[bytes], name: str = "BTCUSDT-trades.csv", codec: str = "none") -> Path:
    data = b"\n".join(lines) + b"\n"
    p = tmp_path / (name + (".gz" if codec == "gzip" else ""))
    p.write_bytes(gzip.compress(data) if codec == "gzip" else data)
    return p


@pytest.mark.parametrize("codec", ["none", "gzip"])
@pytest.mark.parametrize("col", [1, 2, 4, 5])
def test_a_byte_that_is_not_utf8_in_a_mapped_column_refuses_one_row(tmp_path: Path, codec: str, col: int) -> None:
    lines = list(LINES)
    f = lines[502].split(b",")
    f[col] = f[col][:2] + b"\xff" + f[col][2:]
    lines[502] = b",".join(f)  # line 503
    ids, r = read(write(tmp_path, lines, codec=codec))
    t = r.accounting.total
    assert (t.read, t.rejected) == (3000, 1) and ids == ids_without(503)
    with pytest.raises(DataError, match=r"line/record 503"):
        read(write(tmp_path, lines, codec=codec), policy="fail")


def test_a_10_mb_line_refuses_one_row_and_quarantines_a_bounded_excerpt(tmp_path: Path) -> None:
    lines = list(LINES)
    lines[1500] = lines[1500] + b"9" * 10_000_000  # line 1501
    q = tmp_path / "q.jsonl"
    ids, r = read(write(tmp_path, lines), policy="quarantine", quarantine=q)
    t = r.accounting.total
    assert (t.read, t.quarantined) == (3000, 1) and ids == ids_without(1501)
    assert q.stat().st_size < 100_000
    with pytest.raises(DataError, match=r"line/record 1501.*a line of 10,00"):
        read(write(tmp_path, lines), policy="fail")


def test_not_utf8_with_a_wrong_field_count_is_one_row_and_prints_no_traceback(tmp_path: Path) -> None:
    lines = list(LINES)
    lines[700] = b"\xff\xfe,garbage"  # line 701
    p = write(tmp_path, lines)
    code = (f"from nautilus_pipeline.io import Replay, Source; r = Replay([Source({str(p)!r}, format='binance_trades', "
            "policy='reject')]); n = sum(len(b['ts_ns']) for b in r.iter_arrays()); print(n, r.accounting.total.rejected)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["2999", "1"]
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr


def test_error_after_damage_deep_in_the_file_names_the_right_line(tmp_path: Path) -> None:
    lines = list(LINES)
    lines[2501] = b"1,2"  # line 2502, after several small blocks
    from nautilus_pipeline.io.csv import CsvOptions, CsvReader
    from nautilus_pipeline.io.table import FieldMap

    reader = CsvReader(write(tmp_path, lines), FieldMap(ts="time", ts_unit="ms", price="price", size="qty"),
                       CsvOptions(block_size=4096), symbol="BTCUSDT")
    dropped = [d for c in reader.chunks(100) for d in c.dropped]
    assert [(d.record, d.reason.name) for d in dropped] == [(2502, "WRONG_FIELD_COUNT")]


def test_a_blank_first_line_before_the_header_is_not_a_row(tmp_path: Path) -> None:
    ids, r = read(write(tmp_path, [b"", b"  ", *LINES]), policy="fail")
    assert ids == ids_without() and r.accounting.total.read == 3000


def test_a_blank_first_line_before_a_generic_header(tmp_path: Path) -> None:
    p = write(tmp_path, [b"", *LINES])
    mapping = {"ts": "time", "ts_unit": "ms", "price": "price", "size": "qty", "trade_id": "id"}
    ids, _r = read(p, fmt="csv", policy="fail", options={"mapping": mapping}, symbol="BTCUSDT")
    assert ids == ids_without()


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32"])
@pytest.mark.parametrize("fmt", ["binance_trades", "csv", None])
def test_utf16_and_utf32_files_are_refused_up_front_naming_the_encoding(tmp_path: Path, encoding: str, fmt: str | None) -> None:
    p = tmp_path / "BTCUSDT-trades.csv"
    p.write_bytes((b"\n".join(LINES) + b"\n").decode().encode(encoding))
    opts = {"options": {"mapping": {"ts": "time", "price": "price", "size": "qty"}}} if fmt == "csv" else {}
    with pytest.raises(DataError, match=r"UTF-(16|32).*iconv"):
        read(p, fmt=fmt, **opts)


def test_utf16_json_lines_and_feed_captures_are_refused_naming_the_encoding(sample_dir: Path, tmp_path: Path) -> None:
    text = gzip.decompress((sample_dir / "binance-feed-spot-ethusdt_20240808.jsonl.gz").read_bytes())[:20_000]
    text = text[: text.rfind(b"\n") + 1].decode()
    for fmt in ("binance_feed", "jsonl"):
        p = tmp_path / f"{fmt}.jsonl"
        p.write_bytes(text.encode("utf-16"))
        with pytest.raises(DataError, match="UTF-16"):
            read(p, fmt=fmt)


def test_a_utf8_byte_order_mark_reads_like_the_plain_file(tmp_path: Path) -> None:
    ids, _ = read(write(tmp_path, [b"\xef\xbb\xbf" + LINES[0], *LINES[1:]]), policy="fail")
    assert ids == ids_without()
    headerless = [b"\xef\xbb\xbf" + LINES[1], *LINES[2:]]
    ids, r = read(write(tmp_path, headerless, name="BTCUSDT-trades-b.csv"), policy="fail")
    assert ids == ids_without() and r.accounting.total.read == 3000


def test_utf8_symbols_beyond_ascii_are_read(tmp_path: Path) -> None:
    p = tmp_path / "q.csv"
    p.write_text("t,sym,bid,ask\n1,ÄPFEL,1.0,1.1\n2,ÄPFEL,1.0,1.2\n", encoding="utf-8")
    r = Replay([Source(p, format="csv", policy="fail",
                       options={"mapping": {"ts": "t", "ts_unit": "s", "symbol": "sym", "bid": "bid", "ask": "ask"}})])
    blocks = list(r.iter_arrays())
    assert r.symbols.names == ["ÄPFEL"] and int(np.sum([len(b["ts_ns"]) for b in blocks])) == 2
