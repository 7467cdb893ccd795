"""A slab's columns into a live kernel as one argument: a table of their addresses.

Why. numba's dispatcher unboxes every array argument of a call from Python: ~45-55 ns
each on the dev VM. ``scripts/bench_pipeline.py --dispatch`` (loaded VM, load 2.5,
``docs/measurements/dev_dispatch_1594e70.txt``), an empty kernel of 1 / 7 / 14 / 27
arrays: 144 / 306 / 812 / 1,384 ns a call; one table of as many columns, each read once:
154 / 126 / 128 / 129 ns. The live kernels read and write 8 to 18
slab columns per tick, so argument passing cost more than their arithmetic. A slab's
columns never move while its pool lives, so a stage takes their addresses once per slab
(:func:`column_addresses`, cached by :func:`nautilus_pipeline.stage.slab_addresses`) and
its kernel views them again inside numba (:func:`column`, :func:`column2d`), for nothing.
State arrays that are written into, never rebound (the risk book, the model's parameters
and scratch) travel the same way, each with its own shape (:class:`ArrayTable`).

Safety. The table is checked when built: every column C-contiguous with the dtype the
kernel views it as (``LIVE_COLUMNS`` of the kernel's module lists both), rows = the slab's
capacity. The stage's cache is keyed by the slab, which keeps its arrays alive as long as
the table is: a slab's columns are made once, with the slab, and never rebound (a design
that rebound them would have to drop the cache). Only the live wrappers take tables; the kernels they
call take arrays, as every other kernel does, and are tested against their references.

Entry points (:func:`entry_point`). With tables, what is left of a live call's dispatch is
numba resolving the arguments' types to an overload: ~65 of the ~170 ns a call of one
table costs (``bench_pipeline.py --dispatch``). A live wrapper whose arguments are all
Python ints and int64 tables has one overload for good, so its stage calls that overload's
compiled entry directly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numba
import numpy as np
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

ROWS, FIRST = 0, 1
"""Table layout: ``table[ROWS]`` the columns' rows, then one address per column."""


def column_addresses(columns: Mapping[str, np.ndarray], layout: Sequence[tuple]) -> np.ndarray:
    """The int64 table of ``layout``'s columns, in that order, after ``table[ROWS]``. Each
    entry is ``(name, dtype)`` for a 1-D column or ``(name, dtype, width)`` for a 2-D one,
    as the kernel views it; a column of another dtype or shape, or one that is not
    C-contiguous and writeable, is a ``TypeError`` naming it (the kernel would misread it,
    or write through a read-only view)."""
    table = np.empty(FIRST + len(layout), dtype=np.int64)
    rows = None
    for j, (name, dtype, *width) in enumerate(layout):
        a = columns[name]
        if (a.dtype != np.dtype(dtype) or not a.flags.c_contiguous or not a.flags.writeable
                or a.shape[1:] != tuple(width) or (rows is not None and a.shape[0] != rows)):
            raise TypeError(
                f"column {name!r}: a live kernel reads it as C-contiguous {np.dtype(dtype)} of "
                f"shape ({rows or 'rows'}, {', '.join(map(str, width))}), the slab has {a.dtype} "
                f"{a.shape} (contiguous: {a.flags.c_contiguous}, writeable: {a.flags.writeable})")
        rows = a.shape[0]
        table[FIRST + j] = a.ctypes.data
    table[ROWS] = rows or 0
    return table


@intrinsic
def _voidptr(typingctx, address):
    """An int64 address as a ``void*`` (what ``numba.carray`` views)."""
    if not isinstance(address, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return types.voidptr(address), codegen


@njit(cache=True, nogil=True, inline="always")
def column(table, j, dtype):
    """Column ``j`` of ``table`` (its position in the layout) as a 1-D array of ``dtype``."""
    return numba.carray(_voidptr(table[FIRST + j]), (table[ROWS],), dtype)


@njit(cache=True, nogil=True, inline="always")
def column2d(table, j, width, dtype):
    """Column ``j`` of ``table`` as a 2-D array [rows, ``width``] of ``dtype``."""
    return numba.carray(_voidptr(table[FIRST + j]), (table[ROWS], width), dtype)


class ArrayTable:
    """Whole arrays of a kernel's state (each its own shape) as one int64 table: per array,
    its address, rows and columns (1 for a 1-D array), viewed in numba with :func:`array1d`
    and :func:`array2d`. The arrays are kept here beside their table (their memory lives as
    long as it); whoever holds one must not rebind them, only write into them."""

    __slots__ = ("arrays", "table")

    def __init__(self, layout: Sequence[tuple[np.ndarray, type]]):
        table = np.empty(3 * len(layout), dtype=np.int64)
        for j, (a, dtype) in enumerate(layout):
            if a.dtype != np.dtype(dtype) or not a.flags.c_contiguous or a.ndim not in (1, 2):
                raise TypeError(f"state array {j}: a kernel reads it as C-contiguous {np.dtype(dtype)} "
                                f"of 1 or 2 dimensions, got {a.dtype} {a.shape} "
                                f"(contiguous: {a.flags.c_contiguous})")
            table[3 * j : 3 * j + 3] = (a.ctypes.data, a.shape[0], a.shape[1] if a.ndim == 2 else 1)
        self.arrays = tuple(a for a, _ in layout)
        self.table = table


@njit(cache=True, nogil=True, inline="always")
def array1d(table, j, dtype):
    """Array ``j`` of an :class:`ArrayTable`'s table, 1-D, of ``dtype``."""
    return numba.carray(_voidptr(table[3 * j]), (table[3 * j + 1],), dtype)


@njit(cache=True, nogil=True, inline="always")
def array2d(table, j, dtype):
    """Array ``j`` of an :class:`ArrayTable`'s table, 2-D, of ``dtype``."""
    return numba.carray(_voidptr(table[3 * j]), (table[3 * j + 1], table[3 * j + 2]), dtype)


def entry_point(kernel, *args):
    """The compiled entry of numba ``kernel`` for the types of ``args`` (loaded from numba's
    cache, or compiled, on the way): called like ``kernel`` without the dispatcher's type
    resolution. It checks no argument, so it is only for calls whose arguments have these
    types by construction: Python ints and this module's int64 tables."""
    for a in args:
        if not (type(a) is int or (type(a) is np.ndarray and a.dtype == np.int64 and a.ndim == 1
                                   and a.flags.c_contiguous and a.flags.writeable)):
            raise TypeError(f"entry_point({kernel.__name__}): an argument of type {type(a).__name__} "
                            f"(Python ints and int64 tables only)")
    sig = tuple(numba.typeof(a) for a in args)
    done = kernel.overloads.get(sig)
    if done is None:
        kernel.compile(sig)
        done = kernel.overloads[sig]
    return done.entry_point
