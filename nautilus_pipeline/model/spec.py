"""What a model is, independent of the backend that runs it: names, shapes, weights.

The inference stage runs one small MLP on whichever backend is fastest (numpy, torch,
MLX, Core ML). All of them are built from the same two objects:

- :class:`ModelSpec`: the input feature names (in column order), the hidden layer widths,
  the hidden activation and the output name. The output is always one number per row:
  the probability (0..1) that the next move is up.
- :class:`MLPWeights`: the normalisation (``mean``/``std`` of the raw features, from the
  training set) and one ``(weight, bias)`` pair per dense layer. Weights are stored as
  ``(out, in)`` float32, the layout of ``torch.nn.Linear`` and ``mlx.nn.Linear``, so that
  a safetensors file loads into either without transposes.

The normalisation is part of the model, not of the pipeline: the features stage publishes
raw features and every backend computes ``(x - mean) / std`` first. Folding it into the
first layer was weighed and rejected: with raw inputs in the thousands (prices), float32
``x @ (W / std) - W @ (mean / std)`` cancels catastrophically, the explicit subtraction does not.

Files: ``.npz`` (numpy, no pickle) and ``.safetensors``; both keep the spec as JSON and the
same tensor names (``norm.mean``, ``norm.std``, ``layers.{i}.weight``, ``layers.{i}.bias``).
``.npz`` can also store weights as int8 (symmetric, one scale per output row) or float16
to shrink the file; loading dequantizes to float32, so every backend sees the same numbers.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..errors import ConfigError

ACTIVATIONS: tuple[str, ...] = ("relu", "tanh", "silu")
"""Hidden activations every backend implements (the output is always a sigmoid)."""

WeightStorage = Literal["float32", "float16", "int8"]

DEFAULT_MODEL_PATH = Path(__file__).resolve().parents[1] / "models" / "default_mlp.npz"
"""The shipped default model (``scripts/train_default_model.py``; card beside it)."""

_SPEC_KEY = "__spec__"
_META_KEY = "__metadata__"
_FORMAT = "nautilus_pipeline.mlp/1"


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Shape of an MLP: ``len(input_names)`` → ``hidden`` … → 1, sigmoid output."""

    input_names: tuple[str, ...]
    hidden: tuple[int, ...] = (128, 64, 32)
    activation: str = "relu"
    output_name: str = "p_up"

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_names", tuple(str(n) for n in self.input_names))
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        if not self.input_names:
            raise ConfigError("ModelSpec: input_names is empty; a model needs at least one feature")
        dupes = sorted({n for n in self.input_names if self.input_names.count(n) > 1})
        if dupes:
            raise ConfigError(f"ModelSpec: input names repeat: {dupes}; each feature once")
        if any(h <= 0 for h in self.hidden):
            raise ConfigError(f"ModelSpec: hidden widths must be positive, got {self.hidden}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(
                f"ModelSpec: activation {self.activation!r} is not one of {ACTIVATIONS}"
            )

    @property
    def n_inputs(self) -> int:
        """Number of input features (columns of ``x``)."""
        return len(self.input_names)

    @property
    def layer_sizes(self) -> tuple[int, ...]:
        """Widths from input to output, e.g. ``(50, 128, 64, 32, 1)``."""
        return (self.n_inputs, *self.hidden, 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, stored inside model files."""
        return {
            "format": _FORMAT,
            "input_names": list(self.input_names),
            "hidden": list(self.hidden),
            "activation": self.activation,
            "output_name": self.output_name,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelSpec:
        """Inverse of :meth:`to_dict`; rejects files written in another format."""
        if d.get("format") != _FORMAT:
            raise ConfigError(f"model spec format {d.get('format')!r} is not {_FORMAT!r}")
        return cls(
            input_names=tuple(d["input_names"]),
            hidden=tuple(d["hidden"]),
            activation=str(d["activation"]),
            output_name=str(d.get("output_name", "p_up")),
        )


@dataclass(frozen=True, slots=True)
class MLPWeights:
    """Normalisation and dense layers, float32; ``weights[i]`` is ``(out, in)``."""

    mean: np.ndarray
    std: np.ndarray
    weights: tuple[np.ndarray, ...]
    biases: tuple[np.ndarray, ...]
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
        object.__setattr__(self, "mean", f32(self.mean).reshape(-1))
        object.__setattr__(self, "std", f32(self.std).reshape(-1))
        object.__setattr__(self, "weights", tuple(f32(w) for w in self.weights))
        object.__setattr__(self, "biases", tuple(f32(b).reshape(-1) for b in self.biases))
        if len(self.weights) != len(self.biases) or not self.weights:
            raise ConfigError("MLPWeights: need one bias per weight matrix and at least one layer")
        if np.any(~np.isfinite(self.std)) or np.any(self.std <= 0):
            raise ConfigError("MLPWeights: std must be finite and > 0 for every feature")

    @property
    def layer_sizes(self) -> tuple[int, ...]:
        """Widths implied by the matrices, from input to output."""
        return (self.weights[0].shape[1], *(w.shape[0] for w in self.weights))

    @property
    def n_params(self) -> int:
        """Trainable parameters (weights and biases, not the normalisation)."""
        return sum(w.size + b.size for w, b in zip(self.weights, self.biases, strict=True))

    def check(self, spec: ModelSpec) -> None:
        """Raise :class:`ConfigError` unless these weights fit ``spec`` exactly."""
        if self.layer_sizes != spec.layer_sizes:
            raise ConfigError(
                f"weights have layer sizes {self.layer_sizes}, spec says {spec.layer_sizes}"
            )
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            if b.shape != (w.shape[0],):
                raise ConfigError(f"layer {i}: bias shape {b.shape} does not match {w.shape}")
            if i and w.shape[1] != self.weights[i - 1].shape[0]:
                raise ConfigError(f"layer {i}: input width {w.shape[1]} breaks the chain")
        k = spec.n_inputs
        if self.mean.shape != (k,) or self.std.shape != (k,):
            raise ConfigError(
                f"normalisation has {self.mean.shape}/{self.std.shape} entries, model has {k} inputs"
            )

    def tensors(self) -> dict[str, np.ndarray]:
        """Flat name → array mapping (torch/MLX state-dict names)."""
        out = {"norm.mean": self.mean, "norm.std": self.std}
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            out[f"layers.{i}.weight"] = w
            out[f"layers.{i}.bias"] = b
        return out

    @classmethod
    def from_tensors(
        cls, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, Any] | None = None
    ) -> MLPWeights:
        """Inverse of :meth:`tensors`."""
        n = sum(1 for k in tensors if k.startswith("layers.") and k.endswith(".weight"))
        try:
            return cls(
                mean=tensors["norm.mean"],
                std=tensors["norm.std"],
                weights=tuple(tensors[f"layers.{i}.weight"] for i in range(n)),
                biases=tuple(tensors[f"layers.{i}.bias"] for i in range(n)),
                metadata=dict(metadata or {}),
            )
        except KeyError as e:
            raise ConfigError(f"model file lacks tensor {e.args[0]!r}") from None


def random_weights(spec: ModelSpec, seed: int = 0) -> MLPWeights:
    """He-initialised weights, unit normalisation: for tests and benchmarks, not for trading."""
    rng = np.random.default_rng(seed)
    sizes = spec.layer_sizes
    ws, bs = [], []
    for fan_in, fan_out in itertools.pairwise(sizes):
        ws.append(rng.standard_normal((fan_out, fan_in)) * np.sqrt(2.0 / fan_in))
        bs.append(rng.standard_normal(fan_out) * 0.1)
    k = spec.n_inputs
    return MLPWeights(
        mean=rng.standard_normal(k) * 0.1,
        std=rng.uniform(0.5, 2.0, k),
        weights=tuple(ws),
        biases=tuple(bs),
    )


def quantize_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-row int8: ``w ≈ q * scale[:, None]``; returns ``(q, scale)``."""
    amax = np.abs(w).max(axis=1)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def with_weight_precision(weights: MLPWeights, storage: WeightStorage) -> MLPWeights:
    """The float32 weights a file stored at ``storage`` precision loads as.

    Biases and the normalisation stay float32 (they are tiny and sensitive); only the
    matrices lose precision. Used to check how far int8/fp16 files drift from float32.
    """
    if storage == "float32":
        return weights
    if storage == "float16":
        ws = tuple(w.astype(np.float16).astype(np.float32) for w in weights.weights)
    elif storage == "int8":
        ws = tuple(
            q.astype(np.float32) * s[:, None] for q, s in map(quantize_int8, weights.weights)
        )
    else:
        raise ConfigError(f"weight storage {storage!r} is not one of float32, float16, int8")
    return MLPWeights(weights.mean, weights.std, ws, weights.biases, dict(weights.metadata))


def save_model(
    path: str | Path,
    spec: ModelSpec,
    weights: MLPWeights,
    metadata: Mapping[str, Any] | None = None,
    *,
    storage: WeightStorage = "float32",
) -> Path:
    """Write ``spec`` + ``weights`` to ``.npz`` or ``.safetensors`` (by suffix).

    ``metadata`` (JSON-able: training data, seed, accuracy…) travels inside the file.
    ``storage`` int8/float16 applies to ``.npz`` matrices only; safetensors stays float32
    because MLX and torch load it directly.
    """
    weights.check(spec)
    path = Path(path)
    meta = dict(weights.metadata)
    meta.update(metadata or {})
    spec_json = json.dumps(spec.to_dict())
    meta_json = json.dumps(meta, sort_keys=True)
    tensors = weights.tensors()
    if path.suffix == ".safetensors":
        if storage != "float32":
            raise ConfigError("safetensors model files are float32; use .npz for int8/float16")
        from safetensors.numpy import save_file

        save_file(tensors, str(path), metadata={_SPEC_KEY: spec_json, _META_KEY: meta_json})
        return path
    if path.suffix != ".npz":
        raise ConfigError(f"{path}: model files end in .npz or .safetensors")
    arrays: dict[str, np.ndarray] = {}
    for name, a in tensors.items():
        if name.endswith(".weight") and storage == "int8":
            q, s = quantize_int8(a)
            arrays[name + ".q8"] = q
            arrays[name + ".scale"] = s
        elif name.endswith(".weight") and storage == "float16":
            arrays[name + ".f16"] = a.astype(np.float16)
        elif name.endswith(".weight") and storage != "float32":
            raise ConfigError(f"weight storage {storage!r} is not one of float32, float16, int8")
        else:
            arrays[name] = a
    arrays[_SPEC_KEY] = np.array(spec_json)
    arrays[_META_KEY] = np.array(meta_json)
    with path.open("wb") as fh:
        np.savez_compressed(fh, **arrays)
    return path


def load_model(path: str | Path) -> tuple[ModelSpec, MLPWeights]:
    """Read a file written by :func:`save_model`; metadata lands in ``weights.metadata``.

    Nothing in a model file is executed: ``.npz`` is read with ``allow_pickle=False`` (a
    pickle renamed ``.npz``, or an object array inside one, is refused, never unpickled) and
    safetensors holds only raw tensors. A file that is not a readable model of this format
    (garbage, truncated, a wrong spec) is a :class:`ConfigError` naming it, not a traceback.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model file {path} does not exist")
    if path.suffix not in (".npz", ".safetensors"):
        raise ConfigError(f"{path}: model files end in .npz or .safetensors")
    try:
        return _load_model_cached(path) if path.suffix == ".npz" else _load_model(path)
    except ConfigError as e:
        if str(path) in str(e):
            raise
        raise ConfigError(f"{path}: {e}") from None
    except Exception as e:  # numpy, zipfile, safetensors, json: whatever a damaged file raises
        raise ConfigError(f"{path}: not a readable model file ({type(e).__name__}: {e}); "
                          "write it with save_model or scripts/export_model.py") from None


MODEL_CACHE_SIZE = 8
"""Models an ``.npz`` load keeps per process (the most recently used)."""
_loaded: dict[bytes, tuple[ModelSpec, MLPWeights]] = {}
_input_names: dict[bytes, tuple[str, ...]] = {}


def _load_model_cached(path: Path) -> tuple[ModelSpec, MLPWeights]:
    """An ``.npz`` model, parsed once per process for each content: a batch worker builds
    one inference stage per job, and unzipping and checking the default model was a large
    part of each job's build (with the other caches of a warm worker, the build went from
    4.7 to 1.8-2.3 ms, median: ``docs/measurements/dev_bench_batch_ab_60ae7d0.txt``). Keyed by the file's bytes (a BLAKE2
    digest of what was read, parsed from those same bytes), so a model rewritten in place,
    or another file, is parsed anew, never served from the cache; a path alone would not
    tell. The arrays handed out are read-only: every stage that loads the same content
    shares them, and none may write into what the next job reads. ``metadata`` is a copy
    per call."""
    data = path.read_bytes()
    key = hashlib.blake2b(data, digest_size=20).digest()
    hit = _loaded.pop(key, None)
    if hit is None:
        hit = _load_model(path, io.BytesIO(data))
        for a in (hit[1].mean, hit[1].std, *hit[1].weights, *hit[1].biases):
            a.flags.writeable = False
        while len(_loaded) >= MODEL_CACHE_SIZE:
            _loaded.pop(next(iter(_loaded)))
    _loaded[key] = hit  # last: the most recently used
    spec, weights = hit
    return spec, replace(weights, metadata=dict(weights.metadata))


def _load_model(path: Path, data: Any = None) -> tuple[ModelSpec, MLPWeights]:
    """``data``: the ``.npz`` file's bytes as a file object (read from ``path`` otherwise)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as fh:
            header = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    elif path.suffix == ".npz":
        with np.load(path if data is None else data, allow_pickle=False) as z:
            raw = {k: z[k] for k in z.files}
        header = {k: str(raw.pop(k)) for k in (_SPEC_KEY, _META_KEY) if k in raw}
        tensors = {}
        for name, a in raw.items():
            if a.dtype.kind not in "fiu":
                raise ConfigError(f"tensor {name!r} holds {a.dtype} values, not numbers")
            if name.endswith(".q8"):
                base = name[: -len(".q8")]
                tensors[base] = a.astype(np.float32) * raw[base + ".scale"][:, None]
            elif name.endswith(".f16"):
                tensors[name[: -len(".f16")]] = a.astype(np.float32)
            elif not name.endswith(".scale"):
                tensors[name] = a
    if _SPEC_KEY not in header:
        raise ConfigError(f"{path}: no model spec inside; was it written by save_model?")
    spec_dict = json.loads(header[_SPEC_KEY])
    if not isinstance(spec_dict, dict):
        raise ConfigError(f"the model spec is a JSON {type(spec_dict).__name__}, not an object")
    try:
        spec = ModelSpec.from_dict(spec_dict)
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"the model spec is incomplete or of the wrong types ({type(e).__name__}: {e})") from None
    meta = json.loads(header.get(_META_KEY, "{}"))
    if not isinstance(meta, dict):
        meta = {"metadata": meta}
    weights = MLPWeights.from_tensors(tensors, meta)
    weights.check(spec)
    return spec, weights


def read_input_names(path: str | Path) -> tuple[str, ...]:
    """A model file's input names, from its spec header only (no weights are read): what
    a features stage needs to know to produce the model's inputs. ``.npz``: once per process
    for each content, as :func:`_load_model_cached` (another unzip in every batch job's build)."""
    path = Path(path)
    try:
        if path.suffix == ".npz":
            data = path.read_bytes()
            key = hashlib.blake2b(data, digest_size=20).digest()
            names = _input_names.get(key)
            if names is None:
                with np.load(io.BytesIO(data), allow_pickle=False) as z:
                    spec = json.loads(str(z[_SPEC_KEY]))
                names = tuple(str(n) for n in spec["input_names"])
                if len(_input_names) >= MODEL_CACHE_SIZE:
                    _input_names.pop(next(iter(_input_names)))
                _input_names[key] = names
            return names
        elif path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="numpy") as fh:
                spec = json.loads((fh.metadata() or {})[_SPEC_KEY])
        else:
            raise ConfigError(f"{path}: model files end in .npz or .safetensors")
        return tuple(str(n) for n in spec["input_names"])
    except ConfigError:
        raise
    except Exception as e:  # a missing or damaged file: load_model says what is wrong with it
        raise ConfigError(f"{path}: cannot read the model's input names ({type(e).__name__}: {e})") from None


def load_default_model() -> tuple[ModelSpec, MLPWeights]:
    """The shipped default model: default trade features → 128 → 64 → 32 → P(up)."""
    return load_model(DEFAULT_MODEL_PATH)


def check_inputs(spec: ModelSpec, feature_names: Sequence[str]) -> None:
    """Fail at pipeline build when the model's inputs are not the features' columns.

    Order matters (the model reads columns by position), so equal sets in another order
    fail too. The message lists both sides and what differs.
    """
    model, feats = tuple(spec.input_names), tuple(feature_names)
    if model == feats:
        return
    missing = [n for n in model if n not in feats]
    extra = [n for n in feats if n not in model]
    detail = []
    if missing:
        detail.append(f"model inputs missing from the features: {missing}")
    if extra:
        detail.append(f"features the model does not take: {extra}")
    if not missing and not extra:
        detail.append("same names in a different order")
    raise ConfigError(
        "model inputs do not match the features stage's outputs ("
        + "; ".join(detail)
        + f").\n  model inputs ({len(model)}): {list(model)}\n"
        f"  feature names ({len(feats)}): {list(feats)}\n"
        "Retrain/export the model on these features, or configure the features stage "
        "to produce the model's inputs in its order."
    )
