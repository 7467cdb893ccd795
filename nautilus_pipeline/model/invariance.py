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

What. ``REFERENCE_ROWS`` rows like the model's inputs (the features' mean and spread),
predicted as one batch (a replay's usual batch), and the first ``PROBE_ROWS`` of them again one
row at a time and seven at a time. A row off proves the dependence; none off is evidence, not
proof: how often a row is off is not known for every runner (the one count kept, torch:cpu in
512-row calls on that Intel host, a trial since reverted: 15-65 of 5,000 rows off at batches of
one row, which 256 rows would catch with 54-96 % odds by the binomial). Once per machine,
libraries, code, model, runner, tile size and torch threads (``calibration_cache``); with the
cache off (``NAUTILUS_PIPELINE_CACHE=off``), at every start. It makes 1 + 256 + 37 = 294 calls:
at the per-call costs measured (torch:cpu ~56 us on the dev VM, ``dev_bench_torch_cpu_tiles_ab_4da71cf.txt``'s
"before" rows; MLX's CPU backend in 256-row tiles 1.6 ms there, ``dev_bench_inference_paths_4da71cf.txt``,
and ~5.7 ms on a lent H100's 16-core host, ``gpu_bench_inference_tiles_4da71cf_h100.txt``)
~16 ms, ~0.5 s and ~1.7 s.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .base import ModelRunner
from .spec import MLPWeights, ModelSpec

PROBE_ROWS = 256
PROBE_CUTS = (1, 7)
REFERENCE_ROWS = 4096


@dataclass(frozen=True, slots=True)
class Invariance:
    """What the probe found for one runner: of ``rows`` rows cut into batches of ``cuts``,
    ``rows_off`` came out with other bits than in one batch of ``reference_rows``."""

    runner: str
    rows: int
    rows_off: int
    max_abs_diff: float
    cuts: tuple[int, ...] = PROBE_CUTS
    reference_rows: int = REFERENCE_ROWS

    @property
    def holds(self) -> bool:
        """No row off (evidence, not proof: see the module's docstring)."""
        return self.rows_off == 0

    def to_dict(self) -> dict[str, Any]:
        return {"runner": self.runner, "rows": self.rows, "rows_off": self.rows_off,
                "max_abs_diff": self.max_abs_diff, "cuts": list(self.cuts),
                "reference_rows": self.reference_rows}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Invariance:
        return cls(str(d["runner"]), int(d["rows"]), int(d["rows_off"]), float(d["max_abs_diff"]),
                   tuple(int(c) for c in d["cuts"]), int(d["reference_rows"]))


def probe(runner: ModelRunner, spec: ModelSpec, weights: MLPWeights, rows: int = PROBE_ROWS,
          cuts: tuple[int, ...] = PROBE_CUTS, reference_rows: int = REFERENCE_ROWS,
          seed: int = 11) -> Invariance:
    """``reference_rows`` rows through ``runner.predict_tiled`` as one batch, then their first
    ``rows`` cut into batches of each of ``cuts``: how many of those came out with other bits
    (call it on the runner's own thread)."""
    rng = np.random.default_rng(seed)
    n = max(rows, reference_rows)
    x = (rng.standard_normal((n, spec.n_inputs)) * weights.std + weights.mean).astype(np.float32)
    whole = runner.predict_tiled(x, np.empty(n, np.float32))[:rows].copy()
    off = np.zeros(rows, bool)
    max_diff = 0.0
    for size in cuts:
        got = np.empty(rows, np.float32)
        for start in range(0, rows, size):
            part = x[start:min(start + size, rows)].copy()
            got[start:start + len(part)] = runner.predict_tiled(part, np.empty(len(part), np.float32))
        differ = got.view(np.uint32) != whole.view(np.uint32)
        off |= differ
        if differ.any():
            max_diff = max(max_diff, float(np.max(np.abs(got[differ].astype(np.float64) - whole[differ]))))
    return Invariance(runner.name, rows, int(off.sum()), max_diff, tuple(cuts), n)


def probe_cached(runner: ModelRunner, spec: ModelSpec, weights: MLPWeights) -> Invariance:
    """:func:`probe`, once per machine, libraries, code, model, runner, tile size and torch
    threads (``calibration_cache``)."""
    from ..calibration_cache import cached
    from .shelf import model_digest

    inputs: dict[str, Any] = {"runner": runner.name, "model": model_digest(spec, weights),
                              "tile_rows": getattr(runner, "tile_rows", None), "rows": PROBE_ROWS,
                              "cuts": list(PROBE_CUTS), "reference_rows": REFERENCE_ROWS}
    package = getattr(runner, "package", None)  # Core ML runs its .mlpackage, not the weights
    if package is not None:
        stat = Path(package).stat()
        inputs["package"] = [str(Path(package).resolve()), stat.st_mtime_ns, stat.st_size]
    torch = sys.modules.get("torch")
    if torch is not None and runner.backend.startswith("torch:"):
        inputs["torch_threads"] = torch.get_num_threads()  # a CPU product's split follows them
    device = runner.backend.split(":", 1)[1] if runner.backend.endswith((":cuda", ":gpu", ":mps")) else None
    value = cached("inference_batch_invariance", inputs, device,
                   lambda: probe(runner, spec, weights).to_dict())
    return Invariance.from_dict(value)
