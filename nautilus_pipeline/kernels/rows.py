"""Row utilities shared by the kernels and stages of batches that hold several symbols.

Batches carry rows of several symbols (and of trades and quotes) in stream order. Kernels
run per symbol on its rows, and values known only on some rows (a trade's features, a
completed VPIN bucket, a fill) are carried forward to the others "as of" each row, with the
last value of the previous batch as the start, so no row looks ahead and batch size never
changes a result.
"""

from __future__ import annotations

import numpy as np
from numba import njit


def symbol_groups(symbol_id: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """``(symbol_id, row indices)`` per symbol in a batch, rows in stream order.

    A stable sort keeps each symbol's rows in the order they arrived, so per-symbol
    kernels see their stream as it was; symbols come in ascending id order (deterministic).
    """
    sym = np.asarray(symbol_id)
    n = sym.shape[0]
    if n == 0:
        return []
    first = sym[0]
    if n == 1 or (sym[-1] == first and (sym == first).all()):
        # one symbol (every live batch of one row, most replays): no sort
        return [(int(first), np.arange(n))]
    order = np.argsort(sym, kind="stable")
    s = sym[order]
    starts = np.flatnonzero(np.concatenate(([True], s[1:] != s[:-1])))
    ends = np.append(starts[1:], s.shape[0])
    return [(int(s[a]), order[a:b]) for a, b in zip(starts, ends, strict=True)]


def ffill_rows(values: np.ndarray, has: np.ndarray, carry: np.ndarray) -> np.ndarray:
    """Each row gets the values of the latest row with ``has`` at or before it, else ``carry``.

    ``values`` is ``[n, k]`` (rows without ``has`` are ignored), ``carry`` ``[k]``: the
    last values before this batch.
    """
    if has.all():
        return values
    idx = np.where(has, np.arange(has.shape[0]), -1)
    np.maximum.accumulate(idx, out=idx)
    filled = np.concatenate((carry[None, :], values))
    return filled[idx + 1]


@njit(cache=True, nogil=True)
def fill_events_into(n, rows, v0, v1, v2, carry, o0, o1, o2):
    """:func:`ffill_rows` for sparse events of a one-symbol batch, written straight into
    three output columns: row ``r`` of ``o0, o1, o2`` (rows ``[0, n)``) gets the values of
    the last event at a row ``<= r`` (``rows`` ascending; of several events at one row the
    last one), else ``carry``; ``carry`` ends as the last row's values.

    Why a kernel. The VPIN stage's fill of a 262,144-trade batch (a ``[n, 3]`` float array,
    ``searchsorted``, ``ffill_rows``' gather, three strided writes to the slab) took ~15 ms
    on the dev VM, ten times the VPIN kernel itself; this is one pass over the rows.
    """
    c0, c1, c2 = carry[0], carry[1], carry[2]
    j, m = 0, rows.shape[0]
    for r in range(n):
        while j < m and rows[j] == r:
            c0, c1, c2 = v0[j], v1[j], v2[j]
            j += 1
        o0[r] = c0
        o1[r] = c1
        o2[r] = c2
    carry[0], carry[1], carry[2] = c0, c1, c2
