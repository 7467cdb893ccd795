"""Calibrations kept on disk: a start measures the host against the device once per machine.

Why. ``route = "calibrated"`` times the host and the device when a stage binds (the
features' and VPIN's GPU crossover, the model per batch size, the risk stage's Monte Carlo
VaR). On the lent H200 that was most of ``pipelines/gpu.toml``'s 2.5 s start (features
1.1 s, risk 0.8 s, inference 0.6 s; ``scripts/profile_pipeline.py``), paid again by every
run although the answer only changes with the machine, the libraries or the code. So each
answer is stored under a key of everything it depends on, and measured again when any of
it changes:

- what the stage measures (its kind and the parameters that change the work: the feature
  set, the VPIN window, the VaR paths and horizon, the model's weights);
- the device (its name as the driver reports it, e.g. ``NVIDIA H200``) and the host's CPU
  model and usable cores (calibration compares the two);
- Python, numpy, numba, torch (with its CUDA version), MLX where the device is MLX's;
- this package's code: a digest of its ``.py`` files, so any change to a kernel
  recalibrates (a git commit is not always there: the lent machine gets a plain copy).

Where. ``$NAUTILUS_PIPELINE_CACHE/calibration/`` (``$XDG_CACHE_HOME/nautilus_pipeline``, else
``~/.cache/nautilus_pipeline``), one small JSON file per answer. ``NAUTILUS_PIPELINE_CACHE=off``
measures on every start. The cache never fails a start: a file that cannot be read or written
is logged and the measurement used as it is.

Size. Every code change and every new set of batch files adds answers and none is ever asked
for again once its key is gone, so the folder keeps the :data:`MAX_ENTRIES` answers used last
(a hit touches its file; a process's first write, and one an hour after, removes the least
recently used past the limit and the temporary files of writers killed mid-write once they
are an hour old: one listing of the folder, not one per answer written, which a batch of
thousands of symbols writes).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import orjson
import structlog

from .machine import cpu_model, usable_cores

log = structlog.get_logger("nautilus_pipeline.calibration")

ENV = "NAUTILUS_PIPELINE_CACHE"
MAX_ENTRIES = 16384
"""Answers kept (each a JSON file of a few hundred bytes): the most recently used."""
STALE_TMP_S = 3600.0
"""A temporary file this old was left by a writer that died before its rename."""
EVICT_EVERY_S = 3600.0
"""A process looks for answers to remove on its first write and then at most this often."""
_evicted_at = float("-inf")


def cache_dir() -> Path | None:
    """The folder of the stored calibrations, or None when the cache is off."""
    root = os.environ.get(ENV)
    if root is not None and root.strip().lower() in ("off", "0", "no", "false", ""):
        return None
    if root is None:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = str(Path(xdg) / "nautilus_pipeline") if xdg else str(Path.home() / ".cache" / "nautilus_pipeline")
    return Path(root) / "calibration"


@functools.cache
def code_digest() -> str:
    """sha256 of this package's Python sources (relative path and bytes, sorted)."""
    pkg = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(pkg.rglob("*.py")):
        h.update(str(path.relative_to(pkg)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_identity(device: str | None) -> dict[str, Any]:
    """What the answer depends on besides the stage: host, libraries, code and ``device``."""
    import numba
    import numpy

    ident: dict[str, Any] = {
        "cpu": cpu_model(), "cores": usable_cores(), "machine": platform.machine(),
        "python": platform.python_version(), "numpy": numpy.__version__,
        "numba": numba.__version__, "code": code_digest(), "device": device,
    }
    # The installed versions, whether or not imported yet: a route measured across backends
    # (e.g. numpy against mlx:cpu or torch:cpu) depends on them whatever ``device`` is.
    for dist in ("torch", "mlx"):
        ident[dist] = _installed_version(dist)
    torch = sys.modules.get("torch")
    if torch is not None:
        if device is not None and device.startswith("cuda") and torch.cuda.is_available():
            index = torch.device(device).index or 0
            ident["cuda"] = torch.version.cuda
            ident["device_name"] = torch.cuda.get_device_name(index)
    mx = sys.modules.get("mlx.core")
    if mx is not None and device is not None and device.startswith(("mlx", "gpu")):
        ident["mlx_device"] = str(mx.default_device())
    return ident


def cached(kind: str, inputs: Mapping[str, Any], device: str | None,
           measure: Callable[[], Any]) -> Any:
    """``measure()`` for these ``inputs`` on ``device``, the first time on this machine and
    code; the stored value (plain JSON data) every time after. ``kind`` names the answer in
    logs and file names (``features_gpu_min_batch``)."""
    folder = cache_dir()
    if folder is None:
        return measure()
    key = {"kind": kind, "inputs": dict(inputs), "env": device_identity(device)}
    digest = hashlib.sha256(orjson.dumps(key, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS,
                                         default=repr)).hexdigest()[:24]
    path = folder / f"{kind}-{digest}.json"
    try:
        stored = orjson.loads(path.read_bytes())
        if stored.get("key") == orjson.loads(orjson.dumps(key, option=orjson.OPT_NON_STR_KEYS,
                                                          default=repr)):
            log.info("calibration_cached", kind=kind, path=str(path))
            _touch(path)
            return stored["value"]
    except FileNotFoundError:
        pass
    except (OSError, orjson.JSONDecodeError, AttributeError, KeyError) as exc:
        log.warning("calibration_cache_unreadable", path=str(path), error=f"{type(exc).__name__}: {exc}")
    value = measure()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(orjson.dumps({"key": key, "value": value},
                                     option=orjson.OPT_NON_STR_KEYS | orjson.OPT_INDENT_2, default=repr))
        os.replace(tmp, path)
    except (OSError, TypeError) as exc:
        log.warning("calibration_cache_unwritable", path=str(path), error=f"{type(exc).__name__}: {exc}")
    else:
        global _evicted_at
        if time.monotonic() - _evicted_at >= EVICT_EVERY_S:
            _evicted_at = time.monotonic()
            evict(folder)
    return value


def _touch(path: Path) -> None:
    """Mark an answer used now (its mtime), for :func:`evict`; best effort (a read-only cache
    still serves)."""
    try:
        os.utime(path)
    except OSError:
        pass


def evict(folder: Path, keep: int | None = None) -> int:
    """Remove all but the ``keep`` (default :data:`MAX_ENTRIES`) most recently used answers in
    ``folder``, and temporary files older than :data:`STALE_TMP_S`; returns how many files
    went. Files another process removes first, or that cannot be removed, are skipped."""
    keep = MAX_ENTRIES if keep is None else keep
    entries: list[tuple[float, Path]] = []
    removed = 0
    now = time.time()
    try:
        with os.scandir(folder) as found:
            listing = list(found)
    except OSError:
        return 0
    for entry in listing:
        try:
            mtime = entry.stat().st_mtime
        except OSError:
            continue
        name = entry.name
        if name.endswith(".json"):
            entries.append((mtime, Path(entry.path)))
        elif ".tmp" in name and now - mtime > STALE_TMP_S:
            removed += _unlink(Path(entry.path))
    if len(entries) > keep:
        entries.sort()
        for _, path in entries[: len(entries) - keep]:
            removed += _unlink(path)
        log.info("calibration_cache_evicted", folder=str(folder), kept=keep, removed=removed)
    return removed


def _unlink(path: Path) -> int:
    try:
        path.unlink()
    except OSError:
        return 0
    return 1
