"""Damaged order-book and container files (the fuzz damage of ``test_reliability_fuzz.py``): only
this package's errors, every row accounted for, and no bad book row, trade or quote delivered."""

from __future__ import annotations

import gzip
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_reliability_fuzz import CASE_SECONDS, apply, damage, pack, time_bound

from nautilus_pipeline.errors import PipelineError
from nautilus_pipeline.events import KIND_BOOK, KIND_QUOTE, KIND_TRADE
from nautilus_pipeline.io import Replay, Source

TESTS = Path(__file__).parent / "data"
PACKAGE = Path(__file__).resolve().parents[1] / "nautilus_pipeline" / "data"
CASES = 20


def _unzstd(path: Path, limit: int | None = None) -> bytes:
    with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(path.read_bytes()), read_across_frames=True) as r:
        data = r.read()
    return data if limit is None else data[:limit]


def _feather() -> bytes:
    buf = io.BytesIO()
    feather.write_feather(pq.read_table(PACKAGE / "nautilus-binance-btcusdt-trades.parquet").slice(0, 300), buf,
                          chunksize=64)
    return buf.getvalue()


def _zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        lines = (PACKAGE / "binance-um-btcusdt-trades-20240808.csv").read_bytes().split(b"\n")[:300]
        zf.writestr("BTCUSDT-trades-2024-08-08.csv", b"\n".join(lines) + b"\n")
    return buf.getvalue()


def _feed() -> bytes:
    lines = gzip.decompress((PACKAGE / "binance-feed-spot-ethusdt_20240808.jsonl.gz").read_bytes()).split(b"\n")
    return b"\n".join(lines[:300]) + b"\n"


@dataclass(frozen=True)
class Case:
    fmt: str
    name: str
    data: object
    text: bool = True
    options: dict | None = None


BOOK_SAMPLES = {
    "tardis_l2": Case("tardis_book_l2", "l2.csv", lambda: (TESTS / "tardis-binance-futures-incremental-book-l2-resnapshot.csv").read_bytes()),
    "tardis_snapshot": Case("tardis_book_snapshot", "s5.csv", lambda: (TESTS / "tardis-binance-futures-book-snapshot-5-btcusdt.csv").read_bytes()),
    "feed_book": Case("binance_feed", "feed.jsonl", _feed, options={"book": True}),
    "mbo": Case("databento", "mbo.dbn", lambda: _unzstd(PACKAGE / "databento-glbx-esh4-mbo-20231225-head.dbn.zst", 198 + 8 + 56 * 400), text=False),
    "mbp10": Case("databento", "mbp10.dbn", lambda: _unzstd(TESTS / "databento-test-data-mbp-10.dbn.zst"), text=False),
    "nautilus_fixed": Case("parquet", "t.parquet", lambda: (TESTS / "nautilus-128-bit-trades.parquet").read_bytes(), text=False),
    "feather": Case("arrow", "t.feather", _feather, text=False),
    "zip": Case("binance_trades", "BTCUSDT-trades-2024-08-08.zip", _zip, text=False),
    "json_array": Case("json", "t.json", lambda: b"[" + b",\n".join(
        b'{"id":%d,"price":"6000%d.5","qty":"0.01","time":%d,"isBuyerMaker":%s}' % (i, i % 10, 1723075200000 + i,
                                                                                   b"true" if i % 2 else b"false")
        for i in range(200)) + b"]"),
}


def check(cols: dict[str, np.ndarray]) -> None:
    if not cols:
        return
    kind, side, price, size = cols["kind"], cols["side"], cols["price"], cols["size"]
    assert np.isin(kind, (KIND_TRADE, KIND_QUOTE, KIND_BOOK)).all()
    with np.errstate(invalid="ignore"):
        t = kind == KIND_TRADE
        assert (np.isfinite(price[t]) & (price[t] > 0) & np.isfinite(size[t]) & (size[t] > 0)).all(), "bad trade"
        b = kind == KIND_BOOK
        level = b & (side != 0)
        assert np.isin(side[b], (-1, 0, 1)).all(), "bad book side"
        assert (np.isfinite(price[level]) & (price[level] > 0)).all(), "bad level price"
        assert (np.isfinite(size[level]) & (size[level] >= 0)).all(), "bad level size"
        assert np.isnan(price[b & (side == 0)]).all(), "a clear with a price"


def run(key: str, ops: list, codec: str, tmp: Path) -> None:
    c = BOOK_SAMPLES[key]
    data = apply(c.data(), ops)
    path = tmp / (c.name + {"none": "", "gzip": ".gz", "zstd": ".zst"}[codec])
    path.write_bytes(pack(data, codec) if c.text else data)
    with time_bound(CASE_SECONDS):
        try:
            r = Replay([Source(path, format=c.fmt, policy="reject", options=c.options or {})], chunk_rows=128)
            blocks = list(r.iter_arrays(97))
        except PipelineError:
            return
    cols = {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]} if blocks else {}
    t = r.accounting.total
    assert t.read == t.delivered + t.rejected, t
    assert t.delivered == (len(cols["ts_ns"]) if cols else 0)
    check(cols)


@pytest.mark.parametrize("key", sorted(BOOK_SAMPLES))
def test_undamaged_samples_read(key: str, tmp_path: Path) -> None:
    run(key, [], "none", tmp_path)


def _fuzz(key: str):
    @settings(max_examples=CASES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(ops=damage(BOOK_SAMPLES[key].text), codec=st.sampled_from(["none", "none", "gzip"]))
    def test(tmp_path_factory, ops, codec):
        run(key, ops, codec, tmp_path_factory.mktemp(key))

    return test


for _key in BOOK_SAMPLES:
    globals()[f"test_fuzz_{_key}"] = _fuzz(_key)
