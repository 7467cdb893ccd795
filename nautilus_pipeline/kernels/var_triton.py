"""The fused bootstrap kernel of :mod:`.var_batch` (Triton; imported only where it runs).

One program per ``BLOCK`` paths of one report: each path draws its ``horizon`` indices
into the report's return window from Philox4x32-10 (four steps per ``randint4x`` call,
counter ``path · ceil(horizon / 4) + g``, key the report's), maps each 32-bit draw to
``[0, n)`` as ``(u · n) >> 32``, gathers the returns and sums them in float64 in step order,
and stores ``−exposure · sum``. Nothing but the losses is written to memory.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _pick(r_ptr, off, n, u, mask):
    idx = ((u.to(tl.uint64) * n) >> 32).to(tl.int64)
    return tl.load(r_ptr + off + idx, mask=mask, other=0.0)


@triton.jit
def bootstrap_kernel(r_ptr, meta_ptr, exp_ptr, out_ptr, n_paths, horizon, groups,
                     BLOCK: tl.constexpr):
    """meta: int64 rows (out row, window offset, window length, key); exp: float64."""
    rep = tl.program_id(1)
    paths = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = paths < n_paths
    row = tl.load(meta_ptr + rep * 4)
    off = tl.load(meta_ptr + rep * 4 + 1)
    n = tl.load(meta_ptr + rep * 4 + 2).to(tl.uint64)
    key = tl.load(meta_ptr + rep * 4 + 3)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    base = paths * groups
    for g in range(groups):
        c0, c1, c2, c3 = tl.randint4x(key, base + g)
        h = tl.full([BLOCK], g * 4, tl.int64)
        acc += _pick(r_ptr, off, n, c0, live & (h < horizon))
        acc += _pick(r_ptr, off, n, c1, live & (h + 1 < horizon))
        acc += _pick(r_ptr, off, n, c2, live & (h + 2 < horizon))
        acc += _pick(r_ptr, off, n, c3, live & (h + 3 < horizon))
    e = tl.load(exp_ptr + rep)
    tl.store(out_ptr + row * n_paths + paths, -e * acc, mask=live)
