"""Backend registry and measured routing for the inference stage.

``make_runner("torch:cuda", spec, weights)`` builds a runner; ``runner_usable(backend)``
says whether a backend can run here and why not, without building anything. Backends:

=============  =====================================================================
``numpy``      float32 matrix products (alias ``cpu``); always usable
``torch:cpu``  torch eager (``mode="script"``/``"compile"`` optional)
``torch:cuda`` torch on NVIDIA; CUDA-graph replay of 4096-row tiles by default
``torch:mps``  torch on Apple GPUs
``mlx:cpu``    MLX on the CPU
``mlx:gpu``    MLX on Metal, or on CUDA with the ``mlx[cuda]`` build
``coreml:ane`` Core ML on the Neural Engine (``coreml:all``, ``coreml:cpu`` too); macOS only
=============  =====================================================================

:func:`calibrate` replaces fixed "hardware routing thresholds" with measurements: it runs
every usable runner at each batch size, checks its output against the float64 reference,
and picks the fastest per batch size (timing ``predict_tiled``, what the stage calls). Which backend wins depends on the machine and the
batch, so the table and the choice are logged, not assumed. Measured with
``scripts/bench_inference.py`` (50→128→64→32→1, float32; µs at batch 1, rows/s above):

=================== ============ ============= ============ ====================================
runner              b=1 p50 µs   b=256 rows/s  b=4096 rows/s machine
=================== ============ ============= ============ ====================================
numpy                 15.0        2.19M         2.28M       Xeon, 2 cores, 1 BLAS/OMP thread
torch-cpu eager       45.3        2.11M         2.39M       same
torch-cpu script      24.0        2.98M         2.84M       same
mlx-cpu eager         76.9        0.13M         0.13M       same (MLX 0.32.4 CPU GEMM is slow)
numpy                 33.1        1.53M         2.71M       H100 host, Xeon, 16 cores
torch-cpu script      39.4        0.28M        10.46M       same
torch-cuda eager     191.1        1.10M        13.05M       H100, torch 2.11 / CUDA 13.0
torch-cuda graphs     39.7        3.26M        29.57M       same
=================== ============ ============= ============ ====================================

So on the 2-core box numpy owns batch 1 and TorchScript the large batches; on the H100
machine numpy owned batches up to ~64 and CUDA graphs everything larger. (These figures are
of the runners' ``predict`` before every row went through tiles of one size, c9c1f4c:
batch 1 on torch-cuda is now a 4096-row call; not measured again yet.) The seeds' claims
for an M4 Max (37 µs at batch 1, 958K rows/s at batch 256) are not measured here: Core ML
and Metal need a Mac.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..compute.registry import STREAM_NAMES, canonical, runner_backend, usable
from ..errors import BackendUnavailableError, ConfigError
from ..kernels.mlp import mlp_reference
from .base import ModelRunner
from .spec import MLPWeights, ModelSpec

BACKENDS: tuple[str, ...] = ("numpy", *STREAM_NAMES)
"""The names a model runner takes: the compute streams of ``compute/registry.py`` (one
registry), and ``numpy`` for the CPU stream's runner."""
DEFAULT_BATCH_SIZES: tuple[int, ...] = (1, 8, 64, 256, 1024, 4096)


def _split(backend: str) -> tuple[str, str]:
    if backend not in BACKENDS:
        raise ConfigError(f"unknown inference backend {backend!r}; one of {', '.join(BACKENDS)}")
    family, _, device = backend.partition(":")
    return family, device


def runner_usable(backend: str) -> tuple[bool, str]:
    """``(True, what runs)`` or ``(False, why not)`` for one backend name, building nothing.

    The compute registry (``nautilus_pipeline.compute``) decides, so that the inference
    stage, ``nautilus-pipeline devices`` and calibration all give the same answer.
    """
    try:
        _split(backend)
    except ConfigError as e:
        return False, str(e)
    return usable(canonical(backend))


def make_runner(
    backend: str,
    spec: ModelSpec,
    weights: MLPWeights,
    *,
    coreml_package: str | Path | None = None,
    **options: Any,
) -> ModelRunner:
    """Build the runner for ``backend``; raises :class:`BackendUnavailableError` with the reason.

    ``options`` go to the runner: torch ``mode``/``dtype``/``cuda_graphs``/``graph_tiles``/``tile_rows``,
    mlx ``dtype``/``compile``. Core ML uses ``coreml_package`` if given, else exports the
    weights to a temporary package first (needs torch and coremltools).
    """
    family, device = _split(backend)
    weights.check(spec)
    ok, why = runner_usable(backend)
    if not ok:
        raise BackendUnavailableError(f"{backend}: {why}")
    if runner_backend(backend) == "numpy":
        from .numpy_runner import NumpyRunner

        return NumpyRunner(spec, weights, **options)
    if family == "torch":
        from .torch_runner import TorchRunner

        return TorchRunner(spec, weights, device, **options)
    if family == "mlx":
        from .mlx_runner import MLXRunner

        return MLXRunner(spec, weights, device, **options)
    from .coreml_runner import CoreMLRunner

    if coreml_package is None:
        from .export import export_coreml
        from .torch_runner import build_torch_mlp

        out = Path(tempfile.mkdtemp(prefix="nautilus-coreml-")) / "model.mlpackage"
        coreml_package = export_coreml(build_torch_mlp(spec, weights), spec.input_names, out)
    return CoreMLRunner(spec, coreml_package, device, **options)


@dataclass
class Calibration:
    """Median latency per runner and batch size, and the fastest usable runner per batch size."""

    batch_sizes: tuple[int, ...]
    latency_us: dict[str, dict[int, float]] = field(default_factory=dict)
    unusable: dict[str, str] = field(default_factory=dict)
    route: dict[int, str] = field(default_factory=dict)
    runners: dict[str, ModelRunner] = field(default_factory=dict, repr=False)

    def choose(self, n: int) -> str:
        """Runner name for a batch of ``n`` rows: the route of the nearest calibrated size ≥ n."""
        if not self.route:
            raise BackendUnavailableError("no inference backend passed calibration")
        for b in self.batch_sizes:
            if b >= n and b in self.route:
                return self.route[b]
        return self.route[max(self.route)]

    def runner_for(self, n: int) -> ModelRunner:
        """The runner :meth:`choose` names, already built (CUDA graphs captured)."""
        return self.runners[self.choose(n)]

    def to_dict(self) -> dict[str, Any]:
        """Plain data for structured logs."""
        return {
            "batch_sizes": list(self.batch_sizes),
            "latency_us": {
                k: {str(b): v for b, v in d.items()} for k, d in self.latency_us.items()
            },
            "unusable": dict(self.unusable),
            "route": {str(b): r for b, r in self.route.items()},
        }

    def format(self) -> str:
        """Fixed-width table: µs per call (median) and rows/s, the winner marked ``*``."""
        head = f"{'runner':<24}" + "".join(f"{'b=' + str(b):>16}" for b in self.batch_sizes)
        lines = [head, "-" * len(head)]
        for name, row in self.latency_us.items():
            cells = []
            for b in self.batch_sizes:
                us = row.get(b)
                mark = "*" if self.route.get(b) == name else " "
                cells.append(f"{'-':>16}" if us is None else f"{us:>14.1f}{mark} ")
            lines.append(f"{name:<24}" + "".join(cells))
        lines.append("(median µs per call; * = chosen for that batch size)")
        for name, why in self.unusable.items():
            lines.append(f"{name}: unusable: {why}")
        return "\n".join(lines)


def time_calls(
    fn: Callable[[], object],
    *,
    min_repeats: int = 5,
    budget_s: float = 0.1,
    max_repeats: int = 1000,
    warmup: int = 3,
) -> np.ndarray:
    """Wall time of each call of ``fn`` in µs, after ``warmup`` calls, within ``budget_s``."""
    for _ in range(warmup):
        fn()
    times = []
    deadline = time.perf_counter() + budget_s
    while len(times) < max_repeats and (len(times) < min_repeats or time.perf_counter() < deadline):
        t0 = time.perf_counter_ns()
        fn()
        times.append((time.perf_counter_ns() - t0) / 1e3)
    return np.asarray(times)


def calibrate(
    backends: Sequence[str | ModelRunner],
    spec: ModelSpec,
    weights: MLPWeights,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    *,
    budget_s: float = 0.05,
    atol: float = 5e-3,
    seed: int = 0,
    make: Callable[..., ModelRunner] = make_runner,
) -> Calibration:
    """Measure each backend (name or built runner) at each batch size; route to the fastest.

    A backend that is unusable, fails, or disagrees with the float64 reference by more
    than ``atol`` (probability units) is listed under ``unusable`` with the reason and
    never routed to (a runner built here for it is closed). Inputs are random rows around
    the model's feature mean. ``make`` builds a runner from a name (``make_runner``, or the
    shelf's ``take_runner``).
    """
    sizes = tuple(sorted({int(b) for b in batch_sizes}))
    cal = Calibration(batch_sizes=sizes)
    rng = np.random.default_rng(seed)
    xs = {
        b: (rng.standard_normal((b, spec.n_inputs)) * weights.std + weights.mean).astype(np.float32)
        for b in sizes
    }
    top = xs[sizes[-1]]
    ref = mlp_reference(
        top, weights.mean, weights.std, weights.weights, weights.biases, spec.activation
    )
    for item in backends:
        label = item if isinstance(item, str) else item.name
        runner = None
        try:
            runner = make(item, spec, weights) if isinstance(item, str) else item
            # what the inference stage calls (model.base.ModelRunner.predict_tiled)
            err = float(np.max(np.abs(runner.predict_tiled(top, np.empty(len(top), np.float32)) - ref)))
            if not err <= atol:
                raise ConfigError(f"output differs from the reference by {err:.2e} > {atol:.0e}")
            row = {}
            for b in sizes:
                x = xs[b]
                out = np.empty(b, np.float32)
                row[b] = float(np.median(time_calls(
                    lambda r=runner, x=x, out=out: r.predict_tiled(x, out), budget_s=budget_s)))
        except Exception as e:
            cal.unusable[label] = f"{type(e).__name__}: {e}"
            if runner is not None and isinstance(item, str):
                runner.close()
            continue
        cal.runners[runner.name] = runner
        cal.latency_us[runner.name] = row
    for b in sizes:
        timed = {name: row[b] for name, row in cal.latency_us.items()}
        if timed:
            cal.route[b] = min(timed, key=timed.__getitem__)
    return cal


def calibrate_cached(
    backends: Sequence[str],
    spec: ModelSpec,
    weights: MLPWeights,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    *,
    budget_s: float = 0.05,
    built: Sequence[ModelRunner] = (),
) -> Calibration:
    """:func:`calibrate`, measured once per machine, libraries, code and model
    (``calibration_cache``); after that only the runners the stored route names are built
    (CUDA graphs captured; a runner of the same name in ``built`` is taken as it is), and
    the stored table is what ``format()`` prints. A stored runner that now builds under
    another name (graphs refused, say) measures again."""
    from ..calibration_cache import cached
    from .shelf import give_back, model_digest, take_runner

    fresh: dict[str, Calibration] = {}

    def measured() -> Calibration:
        own = {r.backend: r for r in built}  # measured as they are, not built twice
        return calibrate([own.get(b, b) for b in backends], spec, weights, batch_sizes,
                         budget_s=budget_s, make=take_runner)

    def measure() -> dict[str, Any]:
        cal = fresh["cal"] = measured()
        return {**cal.to_dict(), "backends": {name: r.backend for name, r in cal.runners.items()}}

    inputs = {"backends": list(backends), "sizes": sorted({int(b) for b in batch_sizes}),
              "budget_s": budget_s, "model": model_digest(spec, weights)}
    device = next((f"{b.split(':')[1]}" for b in backends if b.endswith((":cuda", ":gpu"))), None)
    value = cached("inference_route", inputs, device, measure)
    if "cal" in fresh:
        return fresh["cal"]
    route = {int(b): name for b, name in value["route"].items()}
    have = {r.name: r for r in built}
    runners: dict[str, ModelRunner] = {}
    for name in dict.fromkeys(route.values()):
        try:
            runner = have.get(name) or take_runner(value["backends"][name], spec, weights)
        except BaseException:
            for r in runners.values():  # the ones taken before it go back
                if r not in built:
                    give_back(r)
            raise
        if runner.name != name:
            for r in (runner, *runners.values()):
                if r not in built:
                    give_back(r)
            return measured()
        runners[name] = runner
    return Calibration(
        batch_sizes=tuple(value["batch_sizes"]),
        latency_us={k: {int(b): v for b, v in row.items()} for k, row in value["latency_us"].items()},
        unusable=dict(value["unusable"]), route=route, runners=runners)
