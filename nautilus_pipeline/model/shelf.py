"""Built model runners kept for the next pipeline of the same process.

Building a runner can cost more than the batches it will run: a ``torch:cuda`` runner
captures its CUDA graphs (of 1 and 4 tiles of rows), and a batch worker builds a new pipeline for
every job (one file), after a warm-up replay that built one too. So a stage that closes
gives its runners back (:func:`give_back`) and the next stage asking for the same backend,
model and options takes one of them (:func:`take_runner`) instead of building it again.

A runner is lent to one stage at a time (its graphs' static buffers are not shared): the
shelf holds at most one per key, and a second stage alive at the same time builds its own.
A stage whose runner raised closes it instead (``InferenceStage.close``). The shelf is off
until :func:`enable` (the batch executors' worker set-up calls it): elsewhere a closed stage
closes its runners and their device memory goes back at once. :func:`clear` closes what
the shelf holds.
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any

import numpy as np

from .base import ModelRunner
from .runners import make_runner
from .spec import MLPWeights, ModelSpec

_lock = threading.Lock()
_shelf: dict[tuple[str, str, str], ModelRunner] = {}
_KEY = "_shelf_key"  # the attribute a runner from take_runner carries its key in
_LENT = "_shelf_lent"  # ... and whether it is lent out now
_enabled = False


def enable(on: bool = True) -> None:
    """Keep given-back runners from now on (``False``: close them, and what is shelved)."""
    global _enabled
    _enabled = on
    if not on:
        clear()


def model_digest(spec: ModelSpec, weights: MLPWeights) -> str:
    """A short hash of the model's architecture and weights (same model, same digest)."""
    h = hashlib.sha256(repr(spec).encode())
    for a in (weights.mean, weights.std, *weights.weights, *weights.biases):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def take_runner(backend: str, spec: ModelSpec, weights: MLPWeights, **options: Any) -> ModelRunner:
    """A runner for ``backend``: the shelved one for this model and options, else a new one
    (:func:`~nautilus_pipeline.model.runners.make_runner`, which raises with the reason)."""
    if not _enabled:
        return make_runner(backend, spec, weights, **options)
    key = (backend, model_digest(spec, weights), repr(sorted(options.items())))
    with _lock:
        runner = _shelf.pop(key, None)
    if runner is None:
        runner = make_runner(backend, spec, weights, **options)
    setattr(runner, _KEY, key)
    setattr(runner, _LENT, True)
    return runner


def give_back(runner: ModelRunner, *, broken: bool = False) -> None:
    """Shelve a runner from :func:`take_runner` for the next stage; close it instead when it
    is ``broken`` (it raised), when one with its key is shelved already, when the shelf is
    off, or when it was not taken from here. A second call for the same loan does nothing."""
    key = getattr(runner, _KEY, None)
    with _lock:
        if key is not None and not getattr(runner, _LENT, False):
            return  # given back already (a stage's runner is in its calibration too)
        if key is not None:
            setattr(runner, _LENT, False)
            if _enabled and not broken and key not in _shelf:
                _shelf[key] = runner
                return
    runner.close()


def shelved() -> int:
    """How many runners the shelf holds."""
    with _lock:
        return len(_shelf)


def clear() -> None:
    """Close every shelved runner."""
    with _lock:
        runners = list(_shelf.values())
        _shelf.clear()
    for r in runners:
        r.close()
