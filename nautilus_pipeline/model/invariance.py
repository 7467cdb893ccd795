"""Does a runner give a row the same bits in any batch, on this machine? Probed, and said.

Why. The rule every analytic keeps (a replay at batch 1 and at batch 4096 gives the same
numbers) holds for the model by construction only on the numpy runner (a fixed-order
kernel). The others tile (``ModelRunner.predict_tiled``) and are right only as far as their
library computes a row alike in every call of one shape: torch:cpu kept the bits on the dev
VM's AMD EPYC and not on a lent H100's Intel host (``model.torch_runner.CPU_TILE_ROWS``;
PyTorch calls it expected, pytorch/pytorch#136338). Which machine does which is not known in
advance, so the inference stage asks this probe when it binds a runner other than numpy's,
and warns when a row came out different: a user who needs the bits then knows to take the
numpy backend, instead of finding two replays that disagree.

What. ``PROBE_ROWS`` rows like the model's inputs (the features' mean and spread), predicted
whole and again one row at a time and seven at a time. A row off proves the dependence; none
off is evidence, not proof (on that Intel host 0.3-1.3 % of rows were off for batches of
one row, so 256 rows catch it with 54-96 % odds per model, by the binomial). Once per machine,
libraries, code, model and runner (``calibration_cache``): 293 calls, which at the per-call
costs measured on the dev VM (torch:cpu ~56 us a call, ``dev_bench_torch_cpu_tiles_ab_4da71cf.txt``'s
"before" rows; MLX's CPU backend 1.6 ms, ``dev_bench_inference_paths_4da71cf.txt``) come to
~16 ms and ~0.5 s, once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .base import ModelRunner
from .spec import MLPWeights, ModelSpec

PROBE_ROWS = 256
PROBE_CUTS = (1, 7)


@dataclass(frozen=True, slots=True)
class Invariance:
    """What the probe found for one runner: rows off (in any cut) of ``rows``."""

    runner: str
    rows: int
    rows_off: int
    max_abs_diff: float
    cuts: tuple[int, ...] = PROBE_CUTS

    @property
    def holds(self) -> bool:
        return self.rows_off == 0

    def to_dict(self) -> dict[str, Any]:
        return {"runner": self.runner, "rows": self.rows, "rows_off": self.rows_off,
                "max_abs_diff": self.max_abs_diff, "cuts": list(self.cuts)}


def probe(runner: ModelRunner, spec: ModelSpec, weights: MLPWeights, rows: int = PROBE_ROWS,
          cuts: tuple[int, ...] = PROBE_CUTS, seed: int = 11) -> Invariance:
    """``rows`` rows through ``runner.predict_tiled`` whole, then cut into batches of each
    of ``cuts``: how many rows came out with other bits (on the runner's own thread)."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, spec.n_inputs)) * weights.std + weights.mean).astype(np.float32)
    whole = runner.predict_tiled(x, np.empty(rows, np.float32)).copy()
    off = np.zeros(rows, bool)
    max_diff = 0.0
    for size in cuts:
        got = np.empty(rows, np.float32)
        for start in range(0, rows, size):
            part = x[start:start + size].copy()
            got[start:start + len(part)] = runner.predict_tiled(part, np.empty(len(part), np.float32))
        differ = got.view(np.uint32) != whole.view(np.uint32)
        off |= differ
        if differ.any():
            max_diff = max(max_diff, float(np.max(np.abs(got[differ].astype(np.float64) - whole[differ]))))
    return Invariance(runner.name, rows, int(off.sum()), max_diff, tuple(cuts))


def probe_cached(runner: ModelRunner, spec: ModelSpec, weights: MLPWeights) -> Invariance:
    """:func:`probe`, once per machine, libraries, code, model and runner (``calibration_cache``)."""
    from ..calibration_cache import cached
    from .shelf import model_digest

    inputs = {"runner": runner.name, "model": model_digest(spec, weights), "rows": PROBE_ROWS,
              "cuts": list(PROBE_CUTS)}
    device = runner.backend.split(":", 1)[1] if runner.backend.endswith((":cuda", ":gpu", ":mps")) else None
    value = cached("inference_batch_invariance", inputs, device,
                   lambda: probe(runner, spec, weights).to_dict())
    return Invariance(value["runner"], int(value["rows"]), int(value["rows_off"]),
                      float(value["max_abs_diff"]), tuple(value["cuts"]))
