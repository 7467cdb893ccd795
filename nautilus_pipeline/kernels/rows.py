"""Row utilities shared by the kernels and stages of batches that hold several symbols.

Batches carry rows of several symbols (and of trades and quotes) in stream order. Kernels
run per symbol on its rows, and values known only on some rows (a trade's features, a
completed VPIN bucket, a fill) are carried forward to the others "as of" each row, with the
last value of the previous batch as the start, so no row looks ahead and batch size never
changes a result.
"""

from __future__ import annotations

import numpy as np


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
