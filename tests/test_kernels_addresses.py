"""Address tables (kernels.addresses): a live kernel sees a slab's columns through one int64
argument, reads and writes the very arrays, and a table that would make it misread a
column is refused when built."""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from nautilus_pipeline.kernels.addresses import (
    ROWS,
    ArrayTable,
    array1d,
    array2d,
    column,
    column2d,
    column_addresses,
    entry_point,
)
from nautilus_pipeline.memory import BufferPool
from nautilus_pipeline.stage import slab_addresses

LAYOUT = (("ts_ns", np.int64), ("price", np.float64), ("kind", np.uint8), ("feats", np.float64, 3))


@njit
def _touch(table, n):
    ts, price, kind = column(table, 0, np.int64), column(table, 1, np.float64), column(table, 2, np.uint8)
    feats = column2d(table, 3, 3, np.float64)
    total = 0.0
    for i in range(n):
        total += price[i] + ts[i]
        kind[i] = 7
        feats[i, 2] = price[i] * 2.0
    return total, ts.shape[0], feats.shape


def _columns(rows=8):
    return {"ts_ns": np.arange(rows, dtype=np.int64), "price": np.linspace(1.0, 2.0, rows),
            "kind": np.zeros(rows, dtype=np.uint8), "feats": np.zeros((rows, 3))}


def test_a_kernel_reads_and_writes_the_columns_through_their_table():
    cols = _columns()
    table = column_addresses(cols, LAYOUT)
    assert table[ROWS] == 8
    total, rows, shape = _touch(table, 5)
    assert total == pytest.approx(float(cols["price"][:5].sum() + cols["ts_ns"][:5].sum()))
    assert rows == 8 and shape == (8, 3)
    assert (cols["kind"][:5] == 7).all() and (cols["kind"][5:] == 0).all()
    np.testing.assert_array_equal(cols["feats"][:5, 2], cols["price"][:5] * 2.0)
    assert (cols["feats"][:, :2] == 0).all() and (cols["feats"][5:] == 0).all()


@pytest.mark.parametrize("name, bad", [
    ("price", np.zeros(8, dtype=np.float32)),  # another dtype
    ("price", np.zeros(16)[::2]),  # not contiguous
    ("price", np.zeros(9)),  # other rows than the first column's
    ("feats", np.zeros((8, 4))),  # another width
    ("feats", np.zeros(8)),  # 1-D where the kernel views 2-D
])
def test_a_column_the_kernel_would_misread_is_refused_by_name(name, bad):
    cols = _columns()
    cols[name] = bad
    with pytest.raises(TypeError, match=repr(name)):
        column_addresses(cols, LAYOUT)


def test_a_stage_cache_holds_one_table_per_slab_and_tells_another_pool_apart():
    """``slab_addresses``: a table per slab, built once; a slab of another pool under the same
    index (a stage reused in a second pipeline) gets its own."""
    from nautilus_pipeline.events import ColumnSpec

    spec = (ColumnSpec("feats", np.dtype(np.float64), (3,)),)
    layout = (("ts_ns", np.int64), ("price", np.float64), ("kind", np.uint8), ("feats", np.float64, 3))
    cache: dict = {}
    pools = [BufferPool.with_outputs(spec, capacity=4, slabs=2, memory="host") for _ in range(2)]
    first = [pools[0].acquire_nowait("t") for _ in range(2)]
    tables = [slab_addresses(cache, lease, layout) for lease in first]
    assert tables[0] is not tables[1] and tables[0][ROWS] == 4
    assert slab_addresses(cache, first[0], layout) is tables[0]
    other = pools[1].acquire_nowait("t")
    assert other.slab.index == first[0].slab.index
    table = slab_addresses(cache, other, layout)
    assert table is not tables[0] and len(cache) == 3
    assert table[1] == other.slab.columns["ts_ns"].ctypes.data
    for lease in (*first, other):
        lease.release("t")


@njit
def _state(table):
    a, b = array1d(table, 0, np.float64), array2d(table, 1, np.int64)
    a[1] += 1.0
    b[1, 2] = 7
    return a.shape[0], b.shape


def test_a_state_table_views_arrays_of_their_own_shapes_and_refuses_a_misfit():
    a, b = np.zeros(5), np.zeros((3, 4), dtype=np.int64)
    t = ArrayTable(((a, np.float64), (b, np.int64)))
    assert t.arrays[0] is a and _state(t.table) == (5, (3, 4))
    assert a[1] == 1.0 and b[1, 2] == 7 and b.sum() == 7
    with pytest.raises(TypeError, match="state array 1"):
        ArrayTable(((a, np.float64), (b, np.float64)))
    with pytest.raises(TypeError, match="state array 0"):
        ArrayTable(((np.zeros((4, 4))[:, 1], np.float64),))


def test_an_entry_point_computes_what_the_kernel_does_and_takes_only_ints_and_tables():
    """``entry_point``: the compiled overload for the arguments' types, called directly,
    gives the dispatcher's answer and writes the same columns; since it checks nothing when
    called, building one for an argument of another type (a float, a numpy int, a float64
    array, a read-only table) is refused."""
    cols = _columns()
    table = column_addresses(cols, LAYOUT)
    direct = entry_point(_touch, table, 5)
    assert direct(table, 5) == _touch(table, 5)
    assert cols["kind"][:5].tolist() == [7] * 5 and cols["kind"][5:].tolist() == [0] * 3
    readonly = table.copy()
    readonly.flags.writeable = False
    for args in ((table, 5.0), (table, np.int64(5)), (np.zeros(3), 5), (readonly, 5),
                 (table.reshape(1, -1), 5)):
        with pytest.raises(TypeError, match="Python ints and int64 tables"):
            entry_point(_touch, *args)
