"""io/arrow_numpy.py against pyarrow's own conversions, and a replay that never asks for pandas."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nautilus_pipeline.io.arrow_numpy import (
    from_numpy,
    nulls,
    scalar,
    strings,
    table_from_rows,
    to_numpy,
)

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "nautilus_pipeline/data/binance-um-btcusdt-trades-20240808.csv"

# records every attempt to import pandas (find_spec runs whether pandas is installed or not)
PANDAS_HOOK = textwrap.dedent("""
    import sys
    asked = []
    class Hook:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "pandas":
                asked.append(name)
            return None
    sys.meta_path.insert(0, Hook())
""")


def _asks_for_pandas_nothing(code: str, timeout: int) -> None:
    """Run ``code`` (after PANDAS_HOOK, which it ends by printing) in a fresh interpreter
    from the checkout's root: it must succeed and no import of pandas be attempted."""
    out = subprocess.run([sys.executable, "-c", PANDAS_HOOK + textwrap.dedent(code)],
                         capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ASKED []" in out.stdout, out.stdout[-3000:]


TYPES = [pa.int8(), pa.int16(), pa.int32(), pa.int64(), pa.uint8(), pa.uint32(), pa.uint64(),
         pa.float32(), pa.float64(), pa.bool_()]


def _values(t: pa.DataType, n: int, rng: np.random.Generator) -> list:
    if pa.types.is_boolean(t):
        return [bool(x) for x in rng.integers(0, 2, n)]
    if pa.types.is_floating(t):
        return [float(x) for x in rng.normal(0, 1e3, n)]
    lo, hi = (0, 200) if pa.types.is_unsigned_integer(t) else (-100, 100)
    return [int(x) for x in rng.integers(lo, hi, n)]


@settings(max_examples=60, deadline=None)
@given(t=st.sampled_from(TYPES), n=st.integers(0, 70), start=st.integers(0, 20),
       chunks=st.integers(1, 3), null_every=st.sampled_from([0, 2, 3, 7]), seed=st.integers(0, 99))
def test_to_numpy_and_nulls_equal_pyarrows_conversion(t, n, start, chunks, null_every, seed):
    """Sliced (an offset that is no multiple of 8), chunked, with and without nulls."""
    rng = np.random.default_rng(seed)
    parts = []
    for _ in range(chunks):
        vals = _values(t, n + start, rng)
        if null_every:
            vals = [None if i % null_every == 0 else v for i, v in enumerate(vals)]
        parts.append(pa.array(vals, type=t).slice(start))
    arr = pa.chunked_array(parts, type=t) if chunks > 1 else parts[0]
    want_null = np.asarray(arr.is_null().to_pylist(), dtype=bool)
    got_null = nulls(arr)
    assert got_null.dtype == bool and got_null.flags.writeable
    np.testing.assert_array_equal(got_null, want_null)
    fill = False if pa.types.is_boolean(t) else 7
    got = to_numpy(arr, fill=fill)
    want = [fill if v is None else v for v in arr.to_pylist()]
    np.testing.assert_array_equal(got, np.asarray(want, dtype=got.dtype))
    if not arr.null_count:
        np.testing.assert_array_equal(to_numpy(arr), arr.to_numpy(zero_copy_only=False))


def test_timestamps_and_dates_are_their_integers():
    ts = pa.array([0, 1_700_000_000_123_456_789, None], type=pa.timestamp("ns", "UTC"))
    np.testing.assert_array_equal(to_numpy(ts, fill=0), [0, 1_700_000_000_123_456_789, 0])
    days = pa.array([0, 19_000], type=pa.date32())
    np.testing.assert_array_equal(to_numpy(days), [0, 19_000])
    with pytest.raises(TypeError, match="no fixed-width"):
        to_numpy(pa.array(["a"]))


def test_from_numpy_round_trips_and_shares_memory():
    x = np.arange(10, dtype=np.float64)
    a = from_numpy(x, mask=x % 3 == 0)
    assert a.type == pa.float64() and a.null_count == 4
    assert a.to_pylist() == [None if i % 3 == 0 else float(i) for i in range(10)]
    b = from_numpy(x)
    x[1] = 42.0
    assert b[1].as_py() == 42.0  # a view, not a copy
    flags = np.array([True, False, True, True, False, False, False, True, True])
    assert from_numpy(flags).to_pylist() == flags.tolist()
    with pytest.raises(TypeError, match="no Arrow type"):
        from_numpy(np.array(["a"], dtype=object))


def test_strings_and_scalars():
    s = strings(["", "BTCUSDT", None, "é"])
    assert s.to_pylist() == ["", "BTCUSDT", None, "é"]
    assert scalar(None, pa.string()).as_py() is None and scalar(None, pa.string()).type == pa.string()
    assert scalar("000", pa.string()).as_py() == "000"
    assert scalar(5, pa.int64()).as_py() == 5 and scalar(5, pa.int64()).type == pa.int64()
    assert scalar(1.5, pa.float64()).as_py() == 1.5
    assert scalar(True, pa.bool_()).as_py() is True


@settings(max_examples=40, deadline=None)
@given(distinct=st.integers(1, 400), n=st.integers(200, 3000), null_share=st.sampled_from([0, 0.1, 0.9]),
       seed=st.integers(0, 99))
def test_long_text_columns_coded_or_not_equal_pyarrows(distinct, n, null_share, seed):
    """Long columns of a few distinct values go through codes and a take; the result is
    pa.array's, nulls, empty and non-ASCII strings included."""
    rng = np.random.default_rng(seed)
    pool = ["", "é", *(f"SYM{i:03d}" for i in range(distinct))]
    values = [None if rng.random() < null_share else pool[i] for i in rng.integers(0, len(pool), n)]
    got = strings(values)
    assert got.type == pa.string() and got.null_count == sum(v is None for v in values)
    assert got.equals(pa.array(values, type=pa.string()))


def test_a_replay_of_the_bundled_file_never_asks_for_pandas():
    """pyarrow imports pandas at its first to_numpy / pa.array / Python-scalar compute call
    where pandas is installed (0.2-0.7 s of a 21K-trade run). A meta-path hook records every
    attempt, so the check holds whether pandas is installed or not."""
    _asks_for_pandas_nothing(f"""
        import nautilus_pipeline as nt
        from nautilus_pipeline.io import Replay, Source

        class Probe(nt.Stage):
            name = "probe"
            reads = ("price",)
            async def process(self, lease, stream, ctx):
                pass

        async def main():
            async with nt.Pipeline([Probe()], batch_size=4096) as pipe:
                replay = Replay([Source({str(BUNDLED)!r}, format="binance_trades",
                                        symbol="BTCUSDT-PERP")], symbols=pipe.symbols)
                async for lease in replay.batches(pipe.pool):
                    await pipe.publish_batch(lease, "replay")
            replay.accounting.check()

        nt.configure_logging(level="warning")
        nt.run(main())
        print("ASKED", asked)
    """, timeout=120)


_scalars = st.one_of(st.none(), st.integers(-2**62, 2**62), st.floats(allow_nan=True, width=64),
                     st.text(max_size=5), st.booleans())


@settings(max_examples=80, deadline=None)
@given(kinds=st.lists(st.sampled_from(["int", "float", "num", "str", "bool", "list", "dict", "any"]),
                      min_size=1, max_size=5),
       n=st.integers(1, 12), data=st.data())
def test_table_from_rows_equals_from_pylist(kinds, n, data):
    """The output sinks' Parquet tables: same schema and values as ``pa.Table.from_pylist``
    (events are numbers, text, bools, lists of text and dicts of numbers; None anywhere)."""
    maybe = lambda s: st.one_of(st.none(), s)  # noqa: E731
    value = {"int": maybe(st.integers(-2**62, 2**62)), "float": maybe(st.floats(width=64)),
             "num": maybe(st.one_of(st.integers(-1000, 1000), st.floats(width=64))),
             "str": maybe(st.text(max_size=6)), "bool": maybe(st.booleans()),
             "list": maybe(st.lists(st.text(max_size=3), max_size=3)),
             "dict": maybe(st.fixed_dictionaries({"a": maybe(st.floats(width=64)),
                                                  "b": st.fixed_dictionaries({"x": st.integers(0, 9)})})),
             "any": _scalars}
    rows = [{f"c{i}": data.draw(value[k]) for i, k in enumerate(kinds)} for _ in range(n)]
    try:
        want = pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return  # rows pyarrow itself refuses (mixed kinds): ours goes to pa.array and refuses too
    got = table_from_rows(rows)
    assert got.schema.equals(want.schema), (got.schema, want.schema)
    def norm(v):  # NaN == NaN, at any depth
        if isinstance(v, float) and v != v:
            return "nan"
        if isinstance(v, dict):
            return {k: norm(x) for k, x in v.items()}
        if isinstance(v, list):
            return [norm(x) for x in v]
        return v

    for name in want.column_names:
        assert [norm(v) for v in got[name].to_pylist()] == [norm(v) for v in want[name].to_pylist()]


def test_the_cli_replay_with_its_outputs_never_asks_for_pandas(tmp_path):
    """``nautilus-pipeline run`` of the bundled file, Parquet outputs included."""
    _asks_for_pandas_nothing(f"""
        from nautilus_pipeline.cli import main
        try:
            main(["run", "pipelines/default.toml", "--ticks", {str(BUNDLED)!r}, "--out",
                  {str(tmp_path / "out")!r}, "--no-progress", "--log-level", "warning"])
        except SystemExit as e:
            assert not e.code, e.code
        print("ASKED", asked)
    """, timeout=300)
    assert (tmp_path / "out" / "risk.parquet").exists() and (tmp_path / "out" / "trace.parquet").exists()


@pytest.mark.parametrize("values", [
    [np.float32(1.5), None], [np.int8(3), np.int8(-1)], [np.uint32(7), None], [np.int64(1), 2],
    [np.float64(1.0), 2.5], [np.bool_(True), None], [1, np.float32(2)], [np.int16(1), np.int32(2)],
])
def test_numpy_scalars_in_rows_keep_the_types_from_pylist_gives(values):
    rows = [{"a": v} for v in values]
    try:
        want = pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return
    got = table_from_rows(rows)
    assert got.schema.equals(want.schema), (got.schema, want.schema)
    assert got["a"].to_pylist() == want["a"].to_pylist()


def test_a_float16_column_still_converts():
    from nautilus_pipeline.io.convert import to_float

    out, missing, bad = to_float(np.array([1.5, 2.0], dtype=np.float16))
    assert out.tolist() == [1.5, 2.0] and not missing.any() and not bad.any()


def test_a_batch_driver_and_its_merge_never_ask_for_pandas(tmp_path):
    """``nautilus-pipeline batch``'s own process, and the merge's path for parts out of time
    order: the merge conforms and sorts each job's parts (a Python ``str`` compared in
    pyarrow, ``pq.read_table``'s ``pyarrow.dataset`` and ``to_numpy`` each imported pandas
    there: 0.23 s of the driver's CPU at the first part)."""
    _asks_for_pandas_nothing(f"""
        from nautilus_pipeline.cli import main
        try:
            main(["batch", "pipelines/default.toml", {str(BUNDLED)!r}, "--out",
                  {str(tmp_path / "out")!r}, "--workers", "1", "--no-progress", "--log-level", "warning"])
        except SystemExit as e:
            assert not e.code, e.code
        # one file streams through the merge; two parts out of time order take its other path
        # (the symbols read, the parts written in order, then sorted)
        import pathlib, numpy as np, pyarrow as pa, pyarrow.parquet as pq
        from nautilus_pipeline.batch.job import JobResult
        from nautilus_pipeline.batch.merge import merge_outputs
        from nautilus_pipeline.io.arrow_numpy import from_numpy, strings
        tmp = pathlib.Path({str(tmp_path)!r})
        results = []
        for i, ts in enumerate([[5, 7], [3, 4]]):
            path = tmp / f"part-{{i}}.parquet"
            pq.write_table(pa.Table.from_arrays([strings(["A", "A"]), from_numpy(np.array(ts))],
                                                names=["symbol", "ts_ns"]), path)
            results.append(JobResult(f"A/{{i:04d}}", (), str(tmp), {{"signals": str(path)}}, {{}}, {{}}, {{}}, b""))
        merged = merge_outputs(tmp / "sorted", results)
        assert not merged["signals"]["streamed"], merged
        got = pq.ParquetFile(tmp / "sorted" / "signals" / "symbol=A" / "part-0.parquet").read()
        assert got["ts_ns"].to_pylist() == [3, 4, 5, 7]
        print("ASKED", asked)
    """, timeout=300)
    assert (tmp_path / "out" / "summary.json").exists() and (tmp_path / "out" / "risk").is_dir()
