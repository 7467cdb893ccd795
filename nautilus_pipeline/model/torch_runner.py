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
doubled throughput at batch 256 (3.2M vs 1.1M rows/s) and 4096 (25M vs 12M rows/s). So on
CUDA the runner replays graphs.

Every row is computed in a call of exactly ``tile_rows`` rows (why: ``model.base.TILE_ROWS``):
cuBLAS picks its kernel by shape, and the per-batch-size graphs (1, 8, 64, … 4096 rows) this
runner had gave a row other last bits in another batch (a batch replay's merged signals
differed from the sequential run's on an H200). On CUDA a tile is 4,096 rows
(``CUDA_TILE_ROWS``): a 4,096-row replay is what gave 25M rows/s above, so large batches
cost what they did, and a live batch of one row costs a 4,096-row call (not measured yet:
``scripts/bench_inference.py --gpu``). Where small batches matter: ``route = "calibrated"`` (they go
to the CPU where it is faster) or a smaller ``tile_rows`` (lower batch-1 latency, more and
smaller products for a large batch); the bits are the same for any one tile size. Graphs are
captured for 1 and 4 tiles (``graph_tiles``, each a run of tile-sized calls); a batch takes
the largest that fits, then smaller ones, the last tile partial: only the batch's own rows
are copied in and out around the replay (the rows after them in the static buffer are
left from before and discarded; rows of an MLP are independent). Without graphs
(``cuda_graphs=False``, MPS) the eager module is called tile by tile, the last tile
padded; on the CPU once, over the rows padded to a multiple of ``tile_rows`` (64; see
:meth:`TorchRunner._eager_tiles`).

Like every runner, one caller at a time: :meth:`predict` and :meth:`predict_tensor` share
the graphs' static buffers, ordered only by the CUDA stream they are queued on (the stage
runs one call at a time on its compute stream).

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
from .base import TILE_ROWS, ModelRunner, write_out
from .spec import MLPWeights, ModelSpec

try:
    import torch
    from torch import nn
except ImportError:  # pragma: no cover - exercised where torch is not installed
    torch = None  # type: ignore[assignment]
    nn = None  # type: ignore[assignment]

DEFAULT_GRAPH_TILES: tuple[int, ...] = (1, 4)
CUDA_TILE_ROWS = 4096
CPU_TILE_ROWS = 64
"""torch:cpu makes one call over the rows padded to a multiple of this. That kept a row's bits
in any batch on the 2-core dev VM's AMD EPYC (torch 2.13) and **not** on a lent H100's 16-core
Intel host (torch 2.11, 16 threads: tests/test_model_tiles.py failed there,
``gpu_tests_tiles_4da71cf_h100.txt``). Calls of one shape on one static buffer (512 rows) did
not keep them there either (batches of one row: 15-65 of 5,000 rows off, by up to 1.2e-7,
``gpu_tiles_cpu_fixed_shape_trial_h100.txt``) and cost the dev VM 5.1 -> 3.6M rows/s at 4,096
rows (``dev_bench_torch_cpu_tiles_ab_4da71cf.txt``, side by side) and ran at 0.7M on the
Intel host (8.3M for one padded call on the H100 host of the lease before: not side by side),
so they were not kept. PyTorch documents this as expected (its numerical-accuracy notes,
"Batched computations or slice computations"; pytorch/pytorch#136338). Where the bits must
not depend on the batch on any CPU, the numpy backend (the default, a fixed-order kernel)
keeps them by construction."""
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
    """A captured graph of ``rows // tile_rows`` tile calls and the device buffers it reads
    and writes (kept alive with it)."""

    graph: Any
    rows: int
    dev_in: Any  # float32 [rows, k]
    dev_out: Any  # float32 [rows]


class TorchRunner(ModelRunner):
    """torch on one device; eager, TorchScript or compiled; on CUDA, graphs of whole tiles."""

    def __init__(
        self,
        spec: ModelSpec,
        weights: MLPWeights,
        device: str = "cpu",
        *,
        mode: str = "eager",
        dtype: str = "float32",
        cuda_graphs: bool | None = None,
        graph_tiles: Sequence[int] = DEFAULT_GRAPH_TILES,
        tile_rows: int | None = None,
    ) -> None:
        ok, why = torch_usable(device)
        if not ok:
            raise BackendUnavailableError(f"torch:{device}: {why}")
        if mode not in ("eager", "script", "compile"):
            raise ConfigError(f"torch mode {mode!r} is not eager, script or compile")
        self.spec = spec
        self.backend = f"torch:{device}"
        self.device = torch.device(device)
        default = {"cpu": CPU_TILE_ROWS, "cuda": CUDA_TILE_ROWS}.get(device, TILE_ROWS)
        self.tile_rows = default if tile_rows is None else int(tile_rows)
        if self.tile_rows < 1 or any(int(g) < 1 for g in graph_tiles):
            raise ConfigError(f"torch tile_rows and graph_tiles must be >= 1, got {tile_rows}, "
                              f"{tuple(graph_tiles)}")
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
        tiles = sorted({int(g) for g in graph_tiles} | {1}) if self._use_graphs else []
        self.name = f"{self.backend}/{'graphs' if self._use_graphs else mode}" + (
            "" if dtype == "float32" else f"/{dtype}")
        self._graphs: list[_Graph] = [self._capture(g * self.tile_rows) for g in reversed(tiles)]
        self._host_in: Any = None  # pinned staging, grown to the largest batch seen
        self._host_out: Any = None

    def _capture(self, rows: int) -> _Graph:
        """One CUDA graph over static device buffers of ``rows`` rows: a call per tile."""
        k, t = self.spec.n_inputs, self.tile_rows
        dev_in = torch.zeros((rows, k), dtype=torch.float32, device=self.device)
        dev_out = torch.zeros(rows, dtype=torch.float32, device=self.device)

        def tiles() -> None:
            for i in range(0, rows, t):
                dev_out[i:i + t].copy_(self._module(dev_in[i:i + t]).to(torch.float32).reshape(-1))

        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(3):  # warm-up outside the graph (cuBLAS workspaces, lazy init)
                tiles()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph):
            tiles()
        return _Graph(graph, rows, dev_in, dev_out)

    def predict(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """See :meth:`ModelRunner.predict`; in whole tiles (a row's bits do not depend on
        its batch); synchronises the device before returning."""
        a = self._features(x)
        n = a.shape[0]
        res = np.empty(n, np.float32) if out is None else out
        if n == 0:
            return res
        if not self._use_graphs:
            with torch.inference_mode():
                t = torch.from_numpy(a)
                if self.device.type != "cpu":
                    t = t.to(self.device)
                y = self._eager_tiles(t)
                if self.device.type != "cpu":
                    y = y.cpu()
                return write_out(y.numpy(), res)
        if self._host_in is None or self._host_in.shape[0] < n:  # grown by doubling, pinned
            rows = max(n, 2 * (0 if self._host_in is None else self._host_in.shape[0]))
            self._host_in = torch.empty((rows, a.shape[1]), dtype=torch.float32, pin_memory=True)
            self._host_out = torch.empty(rows, dtype=torch.float32, pin_memory=True)
        host_in, host_out = self._host_in[:n], self._host_out[:n]
        np.copyto(host_in.numpy(), a)
        self._replay_tiles(host_in, host_out)
        torch.cuda.current_stream(self.device).synchronize()
        np.copyto(res, host_out.numpy())
        return res

    def predict_tiled(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        """``predict`` tiles already (see :meth:`ModelRunner.predict_tiled`)."""
        return self.predict(x, out)

    def predict_tensor(self, x: Any) -> Any:
        """Probabilities (float32 ``[n]``, on this runner's device) for ``x`` already there.

        For a batch whose features a previous stage left on the device: no host copy in,
        and the caller decides what comes back. The same tiles and graphs as :meth:`predict`
        (the same bits), on the caller's current CUDA stream.
        """
        with torch.inference_mode():
            x = x.to(self.device, torch.float32)
            if not self._use_graphs:
                return self._eager_tiles(x)
            y = torch.empty(x.shape[0], dtype=torch.float32, device=self.device)
            self._replay_tiles(x, y)
            return y

    def _replay_tiles(self, src: Any, dst: Any) -> None:
        """``src`` rows (host pinned or on the device) through the graphs into ``dst``: the
        largest graph that the rows left fill, then smaller; the last, partial tile through
        the one-tile graph. Copies queued on the current stream, no synchronisation."""
        n, start = src.shape[0], 0
        while start < n:
            left = n - start
            g = next((g for g in self._graphs if g.rows <= left), self._graphs[-1])
            m = min(g.rows, left)
            g.dev_in[:m].copy_(src[start:start + m], non_blocking=True)
            g.graph.replay()
            dst[start:start + m].copy_(g.dev_out[:m], non_blocking=True)
            start += m

    def _eager_tiles(self, x: Any) -> Any:
        """The module on ``x`` a tile at a time into one result; only the last, partial tile
        is copied, into a zero-padded tile. On the CPU one call over the rows padded to a
        multiple of the tile instead: torch's CPU products gave a row the same bits in any
        call of a multiple of 64 rows (tests/test_model_tiles.py, its gate on each host),
        and 64-row calls had cost 2.4x the time at 4096 rows (bench_inference.py, dev VM)."""
        n, t = x.shape[0], self.tile_rows
        if self.device.type == "cpu" and n % t:
            x = torch.cat((x, x.new_zeros((t - n % t, x.shape[1]))))
        if n == t or self.device.type == "cpu":
            return self._module(x).to(torch.float32).reshape(-1)[:n]
        y = torch.empty(n, dtype=torch.float32, device=x.device)
        for i in range(0, n, t):
            part = x[i:i + t]
            m = part.shape[0]
            if m < t:
                part = torch.cat((part, part.new_zeros((t - m, part.shape[1]))))
            y[i:i + m] = self._module(part).to(torch.float32).reshape(-1)[:m]
        return y

    def close(self) -> None:
        """Drop graphs, pinned buffers and the module so the memory can be reused."""
        self._graphs.clear()
        self._host_in = self._host_out = None
        self._module = None
