"""The torch backends (``torch:cpu``, ``torch:cuda``, ``torch:mps``) and the torch form of the model.

:func:`build_torch_mlp` turns a spec + weights into an ``nn.Sequential``
(``Normalize, Linear, act, …, Linear, Sigmoid``): the same module the default model is
trained as, the one exported to Core ML, and the shape :func:`~nautilus_pipeline.model.export.
spec_from_torch` reads back from users' modules.

Modes: ``eager``; ``script`` (TorchScript: deprecated upstream but still shaves Python
overhead, 24 vs 45 µs at batch 1 on the 2-core Xeon here); ``compile`` (``torch.compile``:
measured here it took 26 s to compile and then 237 µs at batch 1, slower than eager, so it is
offered but used nowhere by default).

On CUDA small batches are launch-bound. Measured on an H100 (``scripts/bench_inference.py``,
50→128→64→32→1): batch 1 takes 200 µs eager, 46 µs replayed as a CUDA graph with the copies
issued around it, 40 µs with the host↔device copies captured inside the graph; graphs also
doubled throughput at batch 256 (3.2M vs 1.1M rows/s) and 4096 (25M vs 12M rows/s). So by
default the runner captures one graph per batch bucket (1, 8, 64, 256, 1024, 4096) with the
copies inside (``graph_copies=False`` issues them outside), pads a batch up to its bucket
(rows of an MLP are independent; padding rows are discarded) and runs larger batches through
the largest graph in chunks.

Normalisation always runs in float32: with float16/bfloat16 weights the cast happens after
it, so raw features in the thousands (prices) keep their precision.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import BackendUnavailableError, ConfigError
from .base import ModelRunner, bucket_for, write_out
from .spec import MLPWeights, ModelSpec

try:
    import torch
    from torch import nn
except ImportError:  # pragma: no cover - exercised where torch is not installed
    torch = None  # type: ignore[assignment]
    nn = None  # type: ignore[assignment]

DEFAULT_GRAPH_BATCHES: tuple[int, ...] = (1, 8, 64, 256, 1024, 4096)
_DTYPES = ("float32", "float16", "bfloat16")


def torch_usable(device: str) -> tuple[bool, str]:
    """Whether ``torch:<device>`` can run here, and why not (``compute.registry`` decides)."""
    from ..compute import usable

    return usable(f"torch:{device}")


if nn is not None:

    class Normalize(nn.Module):
        """``(x - mean) / std`` in float32, then cast to the layers' dtype."""

        def __init__(self, mean: torch.Tensor, std: torch.Tensor, out_dtype: torch.dtype) -> None:
            super().__init__()
            self.register_buffer("mean", mean.to(torch.float32))
            self.register_buffer("std", std.to(torch.float32))
            self.out_dtype = out_dtype

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return ((x.to(torch.float32) - self.mean) / self.std).to(self.out_dtype)


_ACT = {"relu": "ReLU", "tanh": "Tanh", "silu": "SiLU"}


def build_torch_mlp(
    spec: ModelSpec, weights: MLPWeights | None = None, dtype: str = "float32"
) -> nn.Sequential:
    """The model as ``nn.Sequential`` (output ``[n, 1]`` probabilities); random init if no weights."""
    if torch is None:
        raise BackendUnavailableError(torch_usable("cpu")[1])
    if dtype not in _DTYPES:
        raise ConfigError(f"torch dtype {dtype!r} is not one of {_DTYPES}")
    tdtype = getattr(torch, dtype)
    k = spec.n_inputs
    if weights is not None:
        weights.check(spec)
        mean, std = torch.from_numpy(weights.mean.copy()), torch.from_numpy(weights.std.copy())
    else:
        mean, std = torch.zeros(k), torch.ones(k)
    mods: list[nn.Module] = [Normalize(mean, std, tdtype)]
    sizes = spec.layer_sizes
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        lin = nn.Linear(a, b, dtype=tdtype)
        if weights is not None:
            with torch.no_grad():
                lin.weight.copy_(torch.from_numpy(weights.weights[i].copy()).to(tdtype))
                lin.bias.copy_(torch.from_numpy(weights.biases[i].copy()).to(tdtype))
        mods.append(lin)
        mods.append(getattr(nn, _ACT[spec.activation])() if i < len(sizes) - 2 else nn.Sigmoid())
    # no Sequential.to(dtype): it would cast the normalisation buffers too
    return nn.Sequential(*mods).eval()


@dataclass(frozen=True, slots=True)
class _Graph:
    """A captured graph and the static buffers it reads and writes (kept alive with it)."""

    graph: Any
    host_in: Any  # pinned float32 [batch, k]
    host_out: Any  # pinned float32 [batch]
    dev_in: Any
    dev_out: Any
    host_in_np: np.ndarray  # numpy views of the pinned buffers
    host_out_np: np.ndarray


class TorchRunner(ModelRunner):
    """torch on one device; eager, TorchScript or compiled; CUDA graphs per batch bucket."""

    def __init__(
        self,
        spec: ModelSpec,
        weights: MLPWeights,
        device: str = "cpu",
        *,
        mode: str = "eager",
        dtype: str = "float32",
        cuda_graphs: bool | None = None,
        graph_batches: Sequence[int] = DEFAULT_GRAPH_BATCHES,
        graph_copies: bool = True,
    ) -> None:
        ok, why = torch_usable(device)
        if not ok:
            raise BackendUnavailableError(f"torch:{device}: {why}")
        if mode not in ("eager", "script", "compile"):
            raise ConfigError(f"torch mode {mode!r} is not eager, script or compile")
        self.spec = spec
        self.backend = f"torch:{device}"
        self.device = torch.device(device)
        module = build_torch_mlp(spec, weights, dtype).to(self.device)
        if mode == "script":
            with warnings.catch_warnings():  # deprecated upstream, still the fastest CPU path
                warnings.simplefilter("ignore", DeprecationWarning)
                module = torch.jit.freeze(torch.jit.script(module))
        elif mode == "compile":
            module = torch.compile(module, dynamic=True)
        self._module: Any = module
        self._use_graphs = (device == "cuda") if cuda_graphs is None else bool(cuda_graphs)
        if self._use_graphs and device != "cuda":
            raise ConfigError("CUDA graphs need device='cuda'")
        self._buckets = tuple(sorted(int(b) for b in graph_batches)) if self._use_graphs else ()
        self._graph_copies = bool(graph_copies)
        self._graphs: dict[int, _Graph] = {}
        suffix = (
            ("graphs" if graph_copies else "graphs-copies-outside") if self._use_graphs else mode
        )
        self.name = f"{self.backend}/{suffix}" + ("" if dtype == "float32" else f"/{dtype}")
        if self._use_graphs:
            for b in self._buckets:
                self._graphs[b] = self._capture(b)

    def _capture(self, batch: int) -> _Graph:
        """One CUDA graph for ``batch`` rows with static device and pinned host buffers."""
        k = self.spec.n_inputs
        host_in = torch.zeros((batch, k), dtype=torch.float32).pin_memory()
        host_out = torch.zeros(batch, dtype=torch.float32).pin_memory()
        dev_in = torch.zeros((batch, k), dtype=torch.float32, device=self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(3):  # warm-up outside the graph (cuBLAS workspaces, lazy init)
                self._module(dev_in)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph):
            if self._graph_copies:
                dev_in.copy_(host_in, non_blocking=True)
            dev_out = self._module(dev_in).to(torch.float32).reshape(-1)
            if self._graph_copies:
                host_out.copy_(dev_out, non_blocking=True)
        return _Graph(graph, host_in, host_out, dev_in, dev_out, host_in.numpy(), host_out.numpy())

    def predict(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """See :meth:`ModelRunner.predict`; synchronises the device before returning."""
        a = self._features(x)
        n = a.shape[0]
        if self._use_graphs and n > 0:
            res = np.empty(n, np.float32) if out is None else out
            top = self._buckets[-1]
            for start in range(0, n, top):  # batches above the largest bucket: in chunks
                stop = min(n, start + top)
                self._replay(a[start:stop], res[start:stop])
            return res
        with torch.inference_mode():
            t = torch.from_numpy(a)
            if self.device.type != "cpu":
                t = t.to(self.device)
            y = self._module(t).to(torch.float32).reshape(-1)
            if self.device.type != "cpu":
                y = y.cpu()
            return write_out(y.numpy(), out)

    def predict_tensor(self, x: Any) -> Any:
        """Probabilities (float32 ``[n]``, on this runner's device) for ``x`` already there.

        For a batch whose features a previous stage left on the device: no host copy in,
        and the caller decides what comes back. Runs the eager module (the graphs read their
        pinned host buffers); on the caller's current CUDA stream.
        """
        with torch.inference_mode():
            return self._module(x.to(self.device, torch.float32)).to(torch.float32).reshape(-1)

    def _replay(self, a: np.ndarray, res: np.ndarray) -> None:
        """Run ``a`` (at most the largest bucket's rows) through its bucket's graph into ``res``."""
        n = a.shape[0]
        b = bucket_for(n, self._buckets)
        assert b is not None
        g = self._graphs[b]
        np.copyto(g.host_in_np[:n], a)
        if not self._graph_copies:
            g.dev_in.copy_(g.host_in, non_blocking=True)
        g.graph.replay()
        if not self._graph_copies:
            g.host_out.copy_(g.dev_out, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        np.copyto(res, g.host_out_np[:n])

    def close(self) -> None:
        """Drop graphs and the module so device memory can be reused."""
        self._graphs.clear()
        self._module = None
