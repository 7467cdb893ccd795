"""The Core ML backends: ``coreml:ane`` (Neural Engine), ``coreml:all``, ``coreml:cpu``.

Loads a ``.mlpackage`` written by :func:`~nautilus_pipeline.model.export.export_coreml`.
Prediction exists only on macOS (coremltools converts anywhere but predicts only there),
so on any other OS :func:`coreml_usable` answers ``(False, "Core ML prediction needs
macOS")`` and constructing a runner raises :class:`BackendUnavailableError` with that
reason; the stage then falls back along its preference list. Nothing here crashes or
imports the native Core ML proxy on Linux.

The package's batch dimension is enumerated (ANE runs fixed shapes): a batch is padded
with zero rows up to the next enumerated size and the padding's outputs are dropped; a
batch larger than the largest size runs in chunks of that size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..compute.coreml_stream import COMPUTE_UNITS  # suffix → ComputeUnit member
from ..errors import BackendUnavailableError, ConfigError
from .base import TILE_ROWS, ModelRunner, bucket_for, write_out
from .spec import ModelSpec


def coreml_usable(units: str = "ane") -> tuple[bool, str]:
    """Whether ``coreml:<units>`` can run here, and why not (``compute.registry`` decides)."""
    from ..compute import usable

    return usable(f"coreml:{units}")


class CoreMLRunner(ModelRunner):
    """A ``.mlpackage`` on the chosen compute units (macOS only)."""

    def __init__(self, spec: ModelSpec, package: str | Path, units: str = "ane") -> None:
        ok, why = coreml_usable(units)
        if not ok:
            raise BackendUnavailableError(f"coreml:{units}: {why}")
        import coremltools as ct

        path = Path(package)
        if not path.exists():
            raise ConfigError(f"Core ML package {path} does not exist")
        self.spec = spec
        self.package = path  # what runs (model.invariance keys its stored answer on it)
        self.backend = f"coreml:{units}"
        self.name = self.backend
        self._model: Any = ct.models.MLModel(
            str(path), compute_units=getattr(ct.ComputeUnit, COMPUTE_UNITS[units])
        )
        desc = self._model.get_spec().description
        inp = desc.input[0]
        arr = inp.type.multiArrayType
        self._input = inp.name
        self._output = desc.output[0].name
        k = int(arr.shape[-1])
        if k != spec.n_inputs:
            raise ConfigError(f"{path}: package takes {k} features, the spec {spec.n_inputs}")
        sizes = tuple(sorted(int(s.shape[0]) for s in arr.enumeratedShapes.shapes))
        self._buckets = sizes or (int(arr.shape[0]),)
        # one enumerated shape for every row the stage sends (model.base.TILE_ROWS): the
        # largest up to TILE_ROWS, else the smallest (a live row is not a 4096-row call)
        fits = [b for b in self._buckets if b <= TILE_ROWS]
        self.tile_rows = fits[-1] if fits else self._buckets[0]
        self._pads = {b: np.zeros((b, k), np.float32) for b in self._buckets}

    def _run(self, a: np.ndarray) -> np.ndarray:
        n = a.shape[0]
        b = bucket_for(n, self._buckets)
        assert b is not None
        if b != n:
            pad = self._pads[b]
            pad[:n] = a
            a = pad
        y = self._model.predict({self._input: a})[self._output]
        return np.asarray(y, dtype=np.float32).reshape(-1)[:n]

    def predict(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """See :meth:`ModelRunner.predict`; chunks batches above the largest enumerated size."""
        a = self._features(x)
        if a.shape[0] == 0:
            return write_out(np.empty(0, np.float32), out)
        top = self._buckets[-1]
        if a.shape[0] <= top:
            return write_out(self._run(a), out)
        parts = [self._run(a[i : i + top]) for i in range(0, a.shape[0], top)]
        return write_out(np.concatenate(parts), out)
