"""Containers around tick files: zip (+ .CHECKSUM), bz2, Arrow IPC/Feather, JSON arrays, and the
ones we do not open, named as such. Each is built from a bundled real file and must read like it."""

from __future__ import annotations

import bz2
import hashlib
import lzma
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest

from nautilus_pipeline.errors import DataError
from nautilus_pipeline.io import Replay, Source, detect_format

BINANCE = "binance-um-btcusdt-trades-20240808.csv"
NAUTILUS = "nautilus-binance-btcusdt-trades.parquet"


def read(path: Path, **kw) -> dict[str, np.ndarray]:
    blocks = list(Replay([Source(path, **kw)]).iter_arrays())
    return {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}


def same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k], equal_nan=a[k].dtype.kind == "f") for k in a)


@pytest.fixture
def binance_zip(sample_dir: Path, tmp_path: Path) -> Path:
    """As data.binance.vision ships it: BTCUSDT-trades-2024-08-08.zip and its .CHECKSUM."""
    z = tmp_path / "BTCUSDT-trades-2024-08-08.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(sample_dir / BINANCE, "BTCUSDT-trades-2024-08-08.csv")
    digest = hashlib.sha256(z.read_bytes()).hexdigest()
    (tmp_path / (z.name + ".CHECKSUM")).write_text(f"{digest}  {z.name}\n")
    return z


def test_a_binance_zip_reads_like_the_csv_inside(sample_dir: Path, binance_zip: Path) -> None:
    assert detect_format(binance_zip) == "binance_trades"
    got = read(binance_zip)
    want = read(sample_dir / BINANCE, symbol="BTCUSDT")
    assert len(got["ts_ns"]) == 21_313 and same(got, want)


def test_a_checksum_mismatch_is_refused(binance_zip: Path) -> None:
    side = binance_zip.with_name(binance_zip.name + ".CHECKSUM")
    side.write_text("0" * 64 + f"  {binance_zip.name}\n")
    with pytest.raises(DataError, match=r"sha256 [0-9a-f]{64} does not match .*CHECKSUM.*re-download"):
        read(binance_zip)
    side.write_text("not a checksum\n")
    with pytest.raises(DataError, match="not a sha256 checksum file"):
        read(binance_zip)


def test_a_checksum_file_changed_after_a_good_read_is_compared_again(binance_zip: Path) -> None:
    """The archive's digest is cached by path, size and mtime; the .CHECKSUM beside it is not:
    a wrong one written after a good read is refused, the right one put back reads again."""
    side = binance_zip.with_name(binance_zip.name + ".CHECKSUM")
    good = side.read_text()
    assert len(read(binance_zip)["ts_ns"]) == 21_313
    side.write_text("0" * 64 + f"  {binance_zip.name}\n")
    with pytest.raises(DataError, match="does not match"):
        read(binance_zip)
    side.write_text(good)
    assert len(read(binance_zip)["ts_ns"]) == 21_313


def test_a_zip_of_several_files_names_them(sample_dir: Path, tmp_path: Path) -> None:
    z = tmp_path / "two.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.write(sample_dir / BINANCE, "a.csv")
        zf.write(sample_dir / BINANCE, "b.csv")
    with pytest.raises(DataError, match=r"a zip archive of 2 files \(a\.csv, b\.csv\)"):
        detect_format(z)


def test_a_cut_off_zip_is_a_data_error(binance_zip: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.zip"
    cut.write_bytes(binance_zip.read_bytes()[:40_000])
    with pytest.raises(DataError, match=r"cut\.zip"):
        read(cut, format="binance_trades")


def test_bz2_reads_like_the_plain_file(sample_dir: Path, tmp_path: Path) -> None:
    p = tmp_path / "BTCUSDT-trades-2024-08-08.csv.bz2"
    p.write_bytes(bz2.compress((sample_dir / BINANCE).read_bytes()))
    assert detect_format(p) == "binance_trades"
    assert same(read(p), read(sample_dir / BINANCE, symbol="BTCUSDT"))
    cut = tmp_path / "cut.csv.bz2"
    cut.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    with pytest.raises(DataError, match="truncated or corrupt"):
        read(cut, format="binance_trades")


@pytest.mark.parametrize("layout", ["feather", "feather_v1", "ipc_stream"])
def test_arrow_ipc_and_feather_read_like_the_parquet(sample_dir: Path, tmp_path: Path, layout: str) -> None:
    table = pq.read_table(sample_dir / NAUTILUS)
    p = tmp_path / f"btcusdt-trades.{layout}"
    if layout == "feather":
        feather.write_feather(table, p, chunksize=300)
    elif layout == "feather_v1":
        with pytest.warns(DeprecationWarning):
            feather.write_feather(table, p, version=1)
    else:
        with pa.OSFile(str(p), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table, max_chunksize=300)
    assert detect_format(p) == "arrow"
    got = read(p, symbol="BTCUSDT")
    want = read(sample_dir / NAUTILUS, symbol="BTCUSDT")
    assert len(got["ts_ns"]) == 2_001 and same(got, want)


def test_a_json_array_of_trades_reads_like_the_csv(sample_dir: Path, tmp_path: Path) -> None:
    """The shape of Binance's REST /api/v3/trades answer, built from the real CSV's rows."""
    lines = (sample_dir / BINANCE).read_text().splitlines()[1:]
    items = []
    for ln in lines:
        tid, price, qty, quote, ts, maker = ln.split(",")
        items.append({"id": int(tid), "price": price, "qty": qty, "quoteQty": quote, "time": int(ts),
                      "isBuyerMaker": maker == "true", "isBestMatch": True})
    p = tmp_path / "BTCUSDT-trades.json"
    p.write_bytes(orjson.dumps(items, option=orjson.OPT_INDENT_2))
    assert detect_format(p) == "json"
    got, want = read(p, symbol="BTCUSDT"), read(sample_dir / BINANCE, symbol="BTCUSDT")
    for k in ("ts_ns", "price", "size", "side", "trade_id"):
        assert np.array_equal(got[k], want[k]), k
    bad = tmp_path / "bad.json"
    bad.write_bytes(orjson.dumps([items[0], 5, items[1]]))
    r = Replay([Source(bad, symbol="BTCUSDT", policy="reject")])
    assert sum(len(b["ts_ns"]) for b in r.iter_arrays()) == 2
    assert r.accounting.total.read == 3 and r.accounting.total.rejected == 1


@pytest.mark.parametrize("container", ["xz", "tar", "7z"])
def test_unknown_containers_are_named(sample_dir: Path, tmp_path: Path, container: str) -> None:
    src = sample_dir / BINANCE
    if container == "xz":
        p = tmp_path / "t.csv.xz"
        p.write_bytes(lzma.compress(src.read_bytes()))
    elif container == "tar":
        p = tmp_path / "t.tar"
        with tarfile.open(p, "w") as tf:
            tf.add(src, arcname="t.csv")
    else:
        p = tmp_path / "t.7z"
        p.write_bytes(b"7z\xbc\xaf\x27\x1c\x00\x04" + bytes(64))
    with pytest.raises(DataError, match=f"unrecognised container {container}"):
        detect_format(p)


def test_binary_data_that_is_no_format_is_an_unrecognised_container(tmp_path: Path) -> None:
    p = tmp_path / "blob.bin"
    p.write_bytes(np.random.default_rng(1).bytes(5000))
    with pytest.raises(DataError, match=r"unrecognised container \(binary data"):
        detect_format(p)


def test_a_parquet_inside_gzip_says_to_decompress(sample_dir: Path, tmp_path: Path) -> None:
    import gzip

    p = tmp_path / "t.parquet.gz"
    p.write_bytes(gzip.compress((sample_dir / NAUTILUS).read_bytes()))
    with pytest.raises(DataError, match="a Parquet file inside a gzip container"):
        detect_format(p)
    shutil.copy(sample_dir / NAUTILUS, tmp_path / "plain.parquet")
    assert detect_format(tmp_path / "plain.parquet") == "parquet"
