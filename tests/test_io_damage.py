"""Property tests: damage a real file in many ways; the policy holds and nothing is lost.

A copy of the first 300 lines of the bundled Binance USD-M trades gets some of these damages,
on distinct lines: a garbage line, a missing field, a negative price, a zero size, a NaN or
non-numeric price, an unknown side code, an empty line, a timestamp going backwards, a
duplicated row. Optionally compressed, read with a random chunk size, under each policy:

- ``reject``/``quarantine``: exactly the damaged lines are refused, for the right reason, and
  the rest arrive unchanged in order; read = delivered + rejected + quarantined;
- ``fail``: a DataError naming the first damaged line (or none when nothing was damaged).
"""

from __future__ import annotations

import collections
import gzip
import re
import tempfile
from pathlib import Path

import numpy as np
import orjson
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from nautilus_pipeline.errors import DataError
from nautilus_pipeline.io import Replay, Source

SAMPLE = Path(__file__).resolve().parents[1] / "nautilus_pipeline" / "data" / "binance-um-btcusdt-trades-20240808.csv"
LINES = SAMPLE.read_text().splitlines()[:300]
HEADER, DATA = LINES[0], LINES[1:]


def _set(line: str, col: int, value: str) -> str:
    f = line.split(",")
    f[col] = value
    return ",".join(f)


DAMAGES = {
    "garbage": ("wrong_field_count", lambda ln: "garbage"),
    "drop_field": ("wrong_field_count", lambda ln: ln.rsplit(",", 1)[0]),
    "negative_price": ("price_not_positive", lambda ln: _set(ln, 1, "-" + ln.split(",")[1])),
    "zero_size": ("size_not_positive", lambda ln: _set(ln, 2, "0")),
    "nan_price": ("price_not_finite", lambda ln: _set(ln, 1, "nan")),
    "text_price": ("unparsable", lambda ln: _set(ln, 1, "x" + ln.split(",")[1])),
    "underscore_price": ("unparsable", lambda ln: _set(ln, 1, "61_800.3")),
    "empty_price": ("missing_field", lambda ln: _set(ln, 1, "")),
    "bad_side": ("unknown_side", lambda ln: _set(ln, 5, "maybe")),
    "empty_line": ("missing_field", lambda ln: ""),
    "backwards": ("ts_backwards", lambda ln: _set(ln, 4, str(int(DATA[0].split(",")[4]) - 1000))),
}

damage_plan = st.lists(
    st.tuples(st.integers(1, len(DATA) - 1), st.sampled_from([*DAMAGES, "duplicate"])),
    max_size=12,
    unique_by=lambda t: t[0],
)


def build(plan: list[tuple[int, str]]) -> tuple[list[str], dict[int, str], list[int]]:
    """Damaged data lines, {final line number: reason}, and the trade ids that must arrive."""
    damaged = {i for i, d in plan if d != "duplicate"}
    dup_after = collections.defaultdict(list)
    for i, d in plan:
        if d == "duplicate":
            j = next((k for k in range(i, -1, -1) if k not in damaged), None)
            if j is not None:
                dup_after[i].append(j)
    out: list[str] = []
    bad: dict[int, str] = {}
    good_ids: list[int] = []
    kinds = dict(plan)
    for i, line in enumerate(DATA):
        if i in damaged:
            reason, fn = DAMAGES[kinds[i]]
            out.append(fn(line))
            bad[len(out) + 1] = reason
        else:
            out.append(line)
            good_ids.append(int(line.split(",")[0]))
        for j in dup_after.get(i, []):
            out.append(DATA[j])
            bad[len(out) + 1] = "duplicate_trade_id"
    return out, bad, good_ids


def write(dirpath: Path, lines: list[str], codec: str) -> Path:
    raw = ("\n".join([HEADER, *lines]) + "\n").encode()
    if codec == "gzip":
        raw = gzip.compress(raw)
    elif codec == "zstd":
        raw = zstandard.ZstdCompressor().compress(raw)
    p = dirpath / "BTCUSDT-trades-2024-08-08.csv"
    p.write_bytes(raw)
    return p


@given(plan=damage_plan, policy=st.sampled_from(["reject", "quarantine"]), codec=st.sampled_from(["none", "gzip", "zstd"]),
       chunk_rows=st.sampled_from([7, 100, 65_536]), batch=st.sampled_from([50, 4096]))
@settings(max_examples=200, deadline=None)
def test_damaged_rows_are_refused_and_counted(plan: list[tuple[int, str]], policy: str, codec: str, chunk_rows: int, batch: int) -> None:
    lines, bad, good_ids = build(plan)
    with tempfile.TemporaryDirectory() as d:
        path = write(Path(d), lines, codec)
        q = Path(d) / "q.jsonl"
        replay = Replay([Source(path, policy=policy, quarantine=q if policy == "quarantine" else None)], chunk_rows=chunk_rows)
        ids = np.concatenate([b["trade_id"] for b in replay.iter_arrays(batch)] or [np.empty(0, np.int64)])
        assert ids.tolist() == good_ids
        replay.accounting.check()
        counts = replay.accounting.sources[str(path)]
        assert counts.read == len(lines)
        assert getattr(counts, "quarantined" if policy == "quarantine" else "rejected") == len(bad)
        assert dict(counts.by_reason) == dict(collections.Counter(bad.values()))
        if policy == "quarantine":
            entries = [orjson.loads(x) for x in q.read_bytes().splitlines()] if q.exists() else []
            assert sorted((e["record"], e["reason"]) for e in entries) == sorted(bad.items())
            assert all(e["message"].startswith(f"{path}, line/record {e['record']}") for e in entries)
            assert all(e["raw"] == lines[e["record"] - 2] for e in entries)  # the damaged text itself


@given(plan=damage_plan, codec=st.sampled_from(["none", "gzip"]), chunk_rows=st.sampled_from([7, 65_536]))
@settings(max_examples=100, deadline=None)
def test_fail_policy_stops_at_the_first_damaged_line(plan: list[tuple[int, str]], codec: str, chunk_rows: int) -> None:
    lines, bad, good_ids = build(plan)
    with tempfile.TemporaryDirectory() as d:
        path = write(Path(d), lines, codec)
        replay = Replay([Source(path, policy="fail")], chunk_rows=chunk_rows)
        if not bad:
            assert sum(len(b["ts_ns"]) for b in replay.iter_arrays(1000)) == len(good_ids)
            return
        with pytest.raises(DataError) as err:
            for _ in replay.iter_arrays(1000):
                pass
        first = min(bad)
        assert re.search(rf"line/record {first}\b", str(err.value))
        assert bad[first].replace("_", " ") in str(err.value)


FEED = Path(__file__).resolve().parents[1] / "nautilus_pipeline" / "data" / "binance-feed-spot-ethusdt_20240808.jsonl.gz"
FEED_LINES = gzip.decompress(FEED.read_bytes()).splitlines()[:400]


def _msg(line: bytes) -> tuple[bytes, dict]:
    head, _, body = line.partition(b" ")
    return head, orjson.loads(body)


def _edit(line: bytes, fn: object) -> bytes:
    head, msg = _msg(line)
    fn(msg["data"])  # type: ignore[operator]
    return head + b" " + orjson.dumps(msg)


TRADE_DAMAGES = {
    "cut": ("unparsable", lambda ln: ln[: len(ln) // 2]),
    "no_price": ("missing_field", lambda ln: _edit(ln, lambda d: d.pop("p"))),
    "text_price": ("unparsable", lambda ln: _edit(ln, lambda d: d.update(p="abc"))),
    "negative_price": ("price_not_positive", lambda ln: _edit(ln, lambda d: d.update(p="-1"))),
    "zero_size": ("size_not_positive", lambda ln: _edit(ln, lambda d: d.update(q="0"))),
}
QUOTE_DAMAGES = {
    "cut": ("unparsable", lambda ln: ln[: len(ln) // 2]),
    "crossed": ("crossed_quote", lambda ln: _edit(ln, lambda d: d.update(b=str(float(d["a"]) + 1)))),
    "nan_bid": ("price_not_finite", lambda ln: _edit(ln, lambda d: d.update(b="nan"))),
    "negative_size": ("size_not_positive", lambda ln: _edit(ln, lambda d: d.update(B="-2"))),
}
TICK_LINES = [i for i, ln in enumerate(FEED_LINES) if b"@trade" in ln or b"@bookTicker" in ln]


@given(plan=st.lists(st.tuples(st.sampled_from(TICK_LINES), st.integers(0, 4)), max_size=10, unique_by=lambda t: t[0]),
       policy=st.sampled_from(["reject", "quarantine"]), chunk_rows=st.sampled_from([5, 65_536]))
@settings(max_examples=60, deadline=None)
def test_damaged_feed_messages_are_refused_and_counted(plan: list[tuple[int, int]], policy: str, chunk_rows: int) -> None:
    lines = list(FEED_LINES)
    bad: dict[int, str] = {}
    for i, k in plan:
        table = TRADE_DAMAGES if b"@trade" in lines[i] else QUOTE_DAMAGES
        reason, fn = list(table.values())[k % len(table)]
        lines[i] = fn(lines[i])
        bad[i + 1] = reason
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "feed.jsonl"
        path.write_bytes(b"\n".join(lines) + b"\n")
        q = Path(d) / "q.jsonl"
        replay = Replay([Source(path, policy=policy, quarantine=q if policy == "quarantine" else None)], chunk_rows=chunk_rows)
        delivered = sum(len(b["ts_ns"]) for b in replay.iter_arrays(64))
        replay.accounting.check()
        counts = replay.accounting.sources[str(path)]
        assert counts.read == len(TICK_LINES) and delivered == len(TICK_LINES) - len(bad)
        assert dict(counts.by_reason) == dict(collections.Counter(bad.values()))
        assert replay.accounting.ignored[str(path)] == len(FEED_LINES) - len(TICK_LINES)
        if policy == "quarantine" and bad:
            entries = [orjson.loads(x) for x in q.read_bytes().splitlines()]
            assert sorted((e["record"], e["reason"]) for e in entries) == sorted(bad.items())
            assert all(e["raw"] == lines[e["record"] - 1].decode() for e in entries)


def _packed() -> dict[str, bytes]:
    raw = SAMPLE.read_bytes()[:200_000]
    return {"gz": gzip.compress(raw), "zst": zstandard.ZstdCompressor().compress(raw),
            "dbn.zst": (SAMPLE.parent / "databento-glbx-futures-mbp1-20240701.dbn.zst").read_bytes(),
            "jsonl.gz": FEED.read_bytes()[:300_000]}


PACKED = _packed()


@given(kind=st.sampled_from(sorted(PACKED)), frac=st.floats(0.01, 0.99))
@settings(max_examples=40, deadline=None)
def test_cut_off_archives_fail_with_a_data_error_saying_truncated(kind: str, frac: float) -> None:
    data = PACKED[kind]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"BTCUSDT-trades-2024-08-08.{kind}"
        path.write_bytes(data[: max(16, int(len(data) * frac))])
        with pytest.raises(DataError, match="truncated"):
            for _ in Replay([Source(path, policy="reject", symbol="X")]).iter_arrays(4096):
                pass
