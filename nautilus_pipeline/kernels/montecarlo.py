"""The CPU Monte Carlo sampler behind ``mc_var``: draw, gather and sum in one numba loop.

Why a fused loop. The bootstrap of 10,000 paths × 100 steps drew a 1M int64 index array,
gathered a 1M float64 array and summed it: 8 MB of temporaries per VaR report, and 4.2 of
its 4.6–5.0 ms (issue 9's profile). Here each path draws its indices from the generator,
adds the returns as it goes and writes one loss: no temporary larger than the losses
(``n_paths`` float64, owned by the :class:`McSampler` and reused), the GIL released
(``nogil``), so a report runs beside the other stages. Measured by
``scripts/bench_kernels.py`` (``mc_var`` rows).

Generator. xoshiro256+ (Blackman & Vigna), 4×uint64 state, seeded through SplitMix64 as
its authors recommend. Each 64-bit output gives three 21-bit draws (its top 63 bits; the
lowest bit, xoshiro256+'s weakest, is dropped), and an index in ``[0, n)`` is Lemire's
multiply-shift ``(u21·n) >> 21``: some indices are drawn ``⌈2²¹/n⌉`` times in 2²¹ and the
others ``⌊2²¹/n⌋``, a relative bias below ``n/2²¹`` (under 5e-4 for a 1,000-return window,
far below the Monte Carlo error of a quantile of 10,000 paths, ~1e-2). Two 32-bit draws per
output (bias under 3e-7) was the first version: drawing was half of a report's time
(measured: generator alone 0.51 ms, gathers and sums alone 0.50 ms of 1.10 ms for
10,000 × 100, quiet dev VM), and three draws per output take a third of it away.
Normal steps (a window with no returns yet) use the Box–Muller
transform on 53-bit uniforms.

Reproducibility. A sampler's state advances from report to report: one seed fixes every
report of a run. The risk stage keeps one sampler per symbol, seeded from
``(seed, symbol_id)``, so the numbers of a symbol's reports do not depend on how rows of
other symbols were batched with them.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

__all__ = ["McSampler", "splitmix_seed"]

_U64 = np.uint64
_MASK21 = _U64(0x1FFFFF)
LANES = 4


@njit(cache=True, inline="always")
def _rotl(x, k):
    return (x << _U64(k)) | (x >> _U64(64 - k))


@njit(cache=True, inline="always")
def _next(s):
    """One xoshiro256+ output; advances ``s`` (uint64[4]) in place."""
    result = s[0] + s[3]
    t = s[1] << _U64(17)
    s[2] ^= s[0]
    s[3] ^= s[1]
    s[1] ^= s[2]
    s[0] ^= s[3]
    s[2] ^= t
    s[3] = _rotl(s[3], 45)
    return result


@njit(cache=True)
def _splitmix_fill(x, out):
    for i in range(out.shape[0]):
        x = x + _U64(0x9E3779B97F4A7C15)
        z = x
        z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
        out[i] = z ^ (z >> _U64(31))


@njit(cache=True, inline="always")
def _step(a, b, c, d):
    """xoshiro256+ on a state held in four scalars (registers): (output, new state)."""
    result = a + d
    t = b << _U64(17)
    c ^= a
    d ^= b
    b ^= c
    a ^= d
    c ^= t
    d = _rotl(d, 45)
    return result, a, b, c, d


@njit(cache=True, inline="always")
def _index(x, shift, n):
    """Lemire's multiply-shift of the 21-bit field of ``x`` at ``shift``: an index in [0, n)."""
    return (((x >> shift) & _MASK21) * n) >> _U64(21)


@njit(cache=True, nogil=True)
def _bootstrap_losses(s, r, horizon, position, out):
    """``out[p] = −position · Σ_h r[idx]``, uniform indices, for ``LANES`` paths at a time.

    Lane j (one xoshiro state each, rows of ``s``) draws the paths ``p ≡ j (mod LANES)``;
    each 64-bit output gives the indices of three consecutive steps (its top 63 bits as
    21-bit fields, highest first; a path's last output may leave fields unused). Four
    independent lanes keep four additions and four generators in flight: one lane is
    bound by the latency of its own sum.
    """
    n = np.uint64(r.shape[0])
    n_paths = out.shape[0]
    a0, b0, c0, d0 = s[0, 0], s[0, 1], s[0, 2], s[0, 3]
    a1, b1, c1, d1 = s[1, 0], s[1, 1], s[1, 2], s[1, 3]
    a2, b2, c2, d2 = s[2, 0], s[2, 1], s[2, 2], s[2, 3]
    a3, b3, c3, d3 = s[3, 0], s[3, 1], s[3, 2], s[3, 3]
    hi, mid, lo = _U64(43), _U64(22), _U64(1)
    rest = horizon % 3
    for p in range(0, n_paths, LANES):
        t0 = t1 = t2 = t3 = 0.0
        for _ in range(horizon // 3):
            x0, a0, b0, c0, d0 = _step(a0, b0, c0, d0)
            x1, a1, b1, c1, d1 = _step(a1, b1, c1, d1)
            x2, a2, b2, c2, d2 = _step(a2, b2, c2, d2)
            x3, a3, b3, c3, d3 = _step(a3, b3, c3, d3)
            t0 += r[_index(x0, hi, n)]
            t1 += r[_index(x1, hi, n)]
            t2 += r[_index(x2, hi, n)]
            t3 += r[_index(x3, hi, n)]
            t0 += r[_index(x0, mid, n)]
            t1 += r[_index(x1, mid, n)]
            t2 += r[_index(x2, mid, n)]
            t3 += r[_index(x3, mid, n)]
            t0 += r[_index(x0, lo, n)]
            t1 += r[_index(x1, lo, n)]
            t2 += r[_index(x2, lo, n)]
            t3 += r[_index(x3, lo, n)]
        if rest:
            x0, a0, b0, c0, d0 = _step(a0, b0, c0, d0)
            x1, a1, b1, c1, d1 = _step(a1, b1, c1, d1)
            x2, a2, b2, c2, d2 = _step(a2, b2, c2, d2)
            x3, a3, b3, c3, d3 = _step(a3, b3, c3, d3)
            t0 += r[_index(x0, hi, n)]
            t1 += r[_index(x1, hi, n)]
            t2 += r[_index(x2, hi, n)]
            t3 += r[_index(x3, hi, n)]
            if rest == 2:
                t0 += r[_index(x0, mid, n)]
                t1 += r[_index(x1, mid, n)]
                t2 += r[_index(x2, mid, n)]
                t3 += r[_index(x3, mid, n)]
        out[p] = -position * t0
        if p + 1 < n_paths:
            out[p + 1] = -position * t1
        if p + 2 < n_paths:
            out[p + 2] = -position * t2
        if p + 3 < n_paths:
            out[p + 3] = -position * t3
    s[0, 0], s[0, 1], s[0, 2], s[0, 3] = a0, b0, c0, d0
    s[1, 0], s[1, 1], s[1, 2], s[1, 3] = a1, b1, c1, d1
    s[2, 0], s[2, 1], s[2, 2], s[2, 3] = a2, b2, c2, d2
    s[3, 0], s[3, 1], s[3, 2], s[3, 3] = a3, b3, c3, d3


@njit(cache=True, nogil=True)
def _normal_losses(s, sigma, horizon, position, out):
    """``out[p] = −position · σ · Σ_h Z`` with Box–Muller normals, from lane 0's state."""
    s = s[0]
    n_paths = out.shape[0]
    have = False
    spare = 0.0
    scale = 1.0 / 9007199254740992.0  # 2**-53
    for p in range(n_paths):
        total = 0.0
        for _ in range(horizon):
            if have:
                z = spare
                have = False
            else:
                u1 = ((_next(s) >> _U64(11)) + _U64(1)) * scale  # (0, 1]
                u2 = (_next(s) >> _U64(11)) * scale
                rad = math.sqrt(-2.0 * math.log(u1))
                z = rad * math.cos(2.0 * math.pi * u2)
                spare = rad * math.sin(2.0 * math.pi * u2)
                have = True
            total += z
        out[p] = -position * sigma * total


def splitmix_seed(seed: int, stream: int = 0) -> np.ndarray:
    """The xoshiro256+ states (uint64[LANES, 4]) for ``seed`` and a stream (e.g. a symbol id)."""
    mixed = (int(seed) * 0x9E3779B97F4A7C15 + int(stream) * 0xD1B54A32D192ED03) % (1 << 64)
    state = np.empty(4 * LANES, dtype=np.uint64)
    _splitmix_fill(_U64(mixed), state)
    return state.reshape(LANES, 4)


class McSampler:
    """A seeded generator and a reusable loss buffer: path losses for one report at a time.

    ``losses`` is overwritten by each call; read the quantiles before the next one.
    """

    backend = "numpy"

    def __init__(self, seed: int = 0, stream: int = 0):
        self.state = splitmix_seed(seed, stream)
        self._buf = np.empty(0)

    def _out(self, n_paths: int) -> np.ndarray:
        if self._buf.shape[0] != n_paths:
            self._buf = np.empty(n_paths)
        return self._buf

    def bootstrap(self, returns: np.ndarray, horizon: int, n_paths: int, position: float) -> np.ndarray:
        """Losses of ``n_paths`` paths of ``horizon`` steps drawn from ``returns`` (float64)."""
        out = self._out(n_paths)
        _bootstrap_losses(self.state, returns, horizon, float(position), out)
        return out

    def normal(self, sigma: float, horizon: int, n_paths: int, position: float) -> np.ndarray:
        """Losses of ``n_paths`` paths of ``horizon`` normal steps of volatility ``sigma``."""
        out = self._out(n_paths)
        _normal_losses(self.state, float(sigma), horizon, float(position), out)
        return out

    def get_state(self) -> np.ndarray:
        """The generator's position (uint64[LANES, 4], a copy): with :meth:`set_state`, a
        snapshot resumes the exact sequence of draws."""
        return self.state.copy()

    def set_state(self, state: np.ndarray) -> None:
        """Continue from a position :meth:`get_state` returned."""
        s = np.asarray(state)
        if s.dtype != np.uint64 or s.shape != (LANES, 4):
            raise ValueError(f"xoshiro256+ state must be uint64[{LANES}, 4], got {s.dtype}{list(s.shape)}")
        self.state = np.ascontiguousarray(s).copy()
