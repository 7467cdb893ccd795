"""Export a user's torch model to every backend's format: Core ML, ``.npz``, safetensors.

A user brings a torch ``nn.Module`` (or a TorchScript file) plus the feature names it
reads, in column order. From it:

- :func:`export_coreml` writes a Core ML ``mlprogram`` ``.mlpackage`` (optionally with
  8-bit weights). Conversion runs on Linux too; only prediction needs macOS. The batch
  dimension is *enumerated* (1, 8, 64, 256, 1024, 4096 by default) rather than a free
  range because the Neural Engine runs fixed shapes and falls back to the GPU/CPU for
  ranged ones; the runner pads a batch up to the next enumerated size.
- :func:`spec_from_torch` reads an MLP out of the module (``Linear``/activation layers,
  optionally our ``Normalize`` first, ``Sigmoid`` last) and checks the result against the
  module on random inputs, so a module that is not such an MLP fails loudly instead of
  exporting something else. :func:`export_weights` saves that for MLX / numpy.

Core ML computes in float16 by default (the ANE's precision) except the normalisation,
which stays float32: raw features in the thousands (prices) lose their fractional part in
float16 before the mean is subtracted. Pass ``compute_precision="float32"`` to keep all ops
float32 (then the ANE is not used).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..kernels.mlp import mlp_reference
from .spec import (
    MLPWeights,
    ModelSpec,
    WeightStorage,
    save_model,
)

DEFAULT_COREML_BATCHES: tuple[int, ...] = (1, 8, 64, 256, 1024, 4096)
COREML_INPUT_NAME = "features"

_ACT_NAMES = {"ReLU": "relu", "Tanh": "tanh", "SiLU": "silu"}


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise ConfigError("exporting a torch model needs torch (pip install torch)") from None
    return torch


def _load_module(model: Any) -> Any:
    """An ``nn.Module`` as given, or a TorchScript file loaded on CPU."""
    torch = _torch()
    if isinstance(model, str | Path):
        path = Path(model)
        if not path.is_file():
            raise ConfigError(f"TorchScript file {path} does not exist")
        with warnings.catch_warnings():  # TorchScript is deprecated upstream; still the input
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(str(path), map_location="cpu").eval()
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"expected a torch nn.Module or a TorchScript path, got {type(model)}")
    return model.eval()


def _kind(m: Any) -> str:
    """Class name of a module, also for TorchScript modules (which keep it in ``original_name``)."""
    return str(getattr(m, "original_name", type(m).__name__))


def spec_from_torch(
    model: Any,
    input_names: Sequence[str],
    *,
    mean: np.ndarray | None = None,
    std: np.ndarray | None = None,
    output_name: str = "p_up",
) -> tuple[ModelSpec, MLPWeights]:
    """Read ``Normalize? (Linear act)* Linear Sigmoid`` out of ``model`` (Module or TorchScript).

    ``mean``/``std`` supply the normalisation when the module has none (default 0 / 1):
    the module is then taken to expect normalised inputs, the exported MLP raw ones.
    Raises :class:`ConfigError` if the layers are not such an MLP, if the widths do not
    match ``input_names``, or if the extracted MLP disagrees with the module.
    """
    torch = _torch()
    module = _load_module(model)
    names = tuple(input_names)
    leaves = [m for _, m in module.named_modules() if not list(m.children())]
    leaves = [m for m in leaves if _kind(m) not in ("Identity", "Dropout", "Flatten")]
    k = len(names)
    m_mean = np.zeros(k, np.float32) if mean is None else np.asarray(mean, np.float32)
    m_std = np.ones(k, np.float32) if std is None else np.asarray(std, np.float32)
    normalises = bool(leaves) and _kind(leaves[0]) == "Normalize"
    if normalises:
        if mean is not None or std is not None:
            raise ConfigError("the module normalises its inputs already; do not pass mean/std")
        m_mean = leaves[0].mean.detach().cpu().numpy()
        m_std = leaves[0].std.detach().cpu().numpy()
        leaves = leaves[1:]
    kinds = [_kind(m) for m in leaves]
    if not kinds or kinds[-1] != "Sigmoid":
        raise ConfigError(
            f"the model must end in nn.Sigmoid (probability of an up move); its layers are {kinds}"
        )
    body = leaves[:-1]
    dense = body[0::2]
    acts = {_kind(m) for m in body[1::2]}
    if (
        len(body) % 2 != 1
        or any(_kind(m) != "Linear" for m in dense)
        or len(acts) > 1
        or not acts <= set(_ACT_NAMES)
    ):
        raise ConfigError(
            "only MLPs of Linear layers with one hidden activation (ReLU, Tanh or SiLU) "
            f"export to MLX/numpy; this model's layers are {kinds}. Core ML export "
            "(export_coreml) takes any traceable model."
        )
    ws = tuple(m.weight.detach().float().cpu().numpy() for m in dense)
    bs = tuple(
        (
            m.bias.detach().float().cpu().numpy()
            if m.bias is not None
            else np.zeros(m.weight.shape[0])
        )
        for m in dense
    )
    activation = _ACT_NAMES[acts.pop()] if acts else "relu"
    if ws[0].shape[1] != k:
        raise ConfigError(f"the model's first layer takes {ws[0].shape[1]} inputs, {k} names given")
    if ws[-1].shape[0] != 1:
        raise ConfigError(f"the model's last layer has {ws[-1].shape[0]} outputs; need 1")
    spec = ModelSpec(names, tuple(w.shape[0] for w in ws[:-1]), activation, output_name)
    weights = MLPWeights(m_mean, m_std, ws, bs)
    weights.check(spec)
    x = np.random.default_rng(0).standard_normal((64, k)).astype(np.float32) * m_std + m_mean
    fed = x if normalises else ((x - m_mean) / m_std).astype(np.float32)
    with torch.inference_mode():
        want = module(torch.from_numpy(fed)).float().reshape(-1).numpy()
    got = mlp_reference(x, m_mean, m_std, ws, bs, activation)
    if want.shape != got.shape or not np.allclose(want, got, atol=1e-4):
        raise ConfigError(
            "the layers read from the model do not reproduce its output (a forward() that "
            "is not a plain chain of its layers?); export it to Core ML only"
        )
    return spec, weights


def export_weights(
    model: Any,
    input_names: Sequence[str],
    path: str | Path,
    *,
    storage: WeightStorage = "float32",
    metadata: dict[str, Any] | None = None,
    mean: np.ndarray | None = None,
    std: np.ndarray | None = None,
) -> Path:
    """Save the model's MLP for MLX/numpy/torch as ``.npz`` or ``.safetensors`` (by suffix)."""
    spec, weights = spec_from_torch(model, input_names, mean=mean, std=std)
    return save_model(path, spec, weights, metadata, storage=storage)


def _fp32_until_first_dense() -> Callable[[Any], bool]:
    """Core ML op selector: float16 for every op after the first dense layer, float32 before."""
    state = {"dense_seen": False}

    def select(op: Any) -> bool:
        if op.op_type in ("linear", "matmul", "conv"):
            state["dense_seen"] = True
        return state["dense_seen"]

    return select


def export_coreml(
    model: Any,
    input_names: Sequence[str],
    path: str | Path,
    *,
    batch_sizes: Sequence[int] = DEFAULT_COREML_BATCHES,
    quantize: str | None = None,
    compute_precision: str = "float16",
    output_name: str = "p_up",
    metadata: dict[str, str] | None = None,
) -> Path:
    """Convert a torch model (Module or TorchScript path) to a Core ML ``.mlpackage``.

    Input ``features``: float32 ``[batch, len(input_names)]`` with ``batch`` one of
    ``batch_sizes``; output ``output_name``: float32 ``[batch, 1]``. ``quantize="int8"``
    stores weights as 8-bit (symmetric, per channel); the feature names and ``metadata``
    are written into the package's user-defined metadata.
    """
    torch = _torch()
    try:
        import coremltools as ct
    except ImportError:
        raise ConfigError("Core ML export needs coremltools (pip install coremltools)") from None
    module = _load_module(model)
    names = tuple(input_names)
    k = len(names)
    sizes = sorted({int(b) for b in batch_sizes})
    if not sizes or sizes[0] < 1:
        raise ConfigError(f"batch_sizes must be positive, got {batch_sizes}")
    path = Path(path)
    if path.suffix != ".mlpackage":
        raise ConfigError(f"{path}: a Core ML ML program is saved as a .mlpackage")
    example = torch.zeros((sizes[0], k), dtype=torch.float32)
    with warnings.catch_warnings():  # coremltools converts TorchScript (deprecated in torch 2.13)
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = (
            module
            if isinstance(module, torch.jit.ScriptModule)
            else torch.jit.trace(module, example)
        )
    if compute_precision == "float16":
        precision = ct.transform.FP16ComputePrecision(op_selector=_fp32_until_first_dense())
    elif compute_precision == "float32":
        precision = ct.precision.FLOAT32
    else:
        raise ConfigError(f"compute_precision {compute_precision!r} is not float16 or float32")
    shape: Any = (
        ct.EnumeratedShapes(shapes=[(b, k) for b in sizes], default=(sizes[0], k))
        if len(sizes) > 1
        else (sizes[0], k)
    )
    mlmodel = ct.convert(
        traced,
        inputs=[ct.TensorType(name=COREML_INPUT_NAME, shape=shape, dtype=np.float32)],
        outputs=[ct.TensorType(name=output_name, dtype=np.float32)],
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.macOS13,
        compute_precision=precision,
    )
    if quantize == "int8":
        from coremltools.optimize.coreml import (
            OpLinearQuantizerConfig,
            OptimizationConfig,
            linear_quantize_weights,
        )

        cfg = OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", weight_threshold=0)
        mlmodel = linear_quantize_weights(mlmodel, OptimizationConfig(global_config=cfg))
    elif quantize is not None:
        raise ConfigError(f"quantize {quantize!r} is not None or 'int8'")
    mlmodel.short_description = f"P(up move) from {k} features"
    meta = {"nautilus.input_names": ",".join(names), "nautilus.quantize": str(quantize)}
    meta.update(metadata or {})
    mlmodel.user_defined_metadata.update(meta)
    mlmodel.save(str(path))
    return path


def coreml_io(path: str | Path) -> dict[str, Any]:
    """Inputs/outputs of a saved ``.mlpackage`` as plain data (readable on Linux).

    ``{"inputs": [{"name", "dtype", "shape", "batch_sizes"}], "outputs": [{"name", "dtype"}],
    "input_names": [...], "metadata": {...}, "weight_dtypes": {"float16"} or {"int8"}}``
    (the storage types of the 2-D constant tensors, i.e. the dense weights).
    """
    import coremltools as ct

    spec = ct.utils.load_spec(str(path))
    dtypes = {
        65568: "float32",
        65552: "float16",
        131104: "int32",
        65600: "float64",
    }  # ArrayDataType
    inputs = []
    for i in spec.description.input:
        arr = i.type.multiArrayType
        inputs.append(
            {
                "name": i.name,
                "dtype": dtypes.get(arr.dataType, str(arr.dataType)),
                "shape": tuple(int(d) for d in arr.shape),
                "batch_sizes": tuple(int(s.shape[0]) for s in arr.enumeratedShapes.shapes),
            }
        )
    outputs = [
        {"name": o.name, "dtype": dtypes.get(o.type.multiArrayType.dataType, "?")}
        for o in spec.description.output
    ]
    meta = dict(spec.description.metadata.userDefined)
    names = meta.get("nautilus.input_names", "")
    mil_dtypes = {10: "float16", 11: "float32", 21: "int8", 31: "uint8"}
    weight_dtypes: set[str] = set()
    for fn in spec.mlProgram.functions.values():
        for block in fn.block_specializations.values():
            for op in block.operations:
                for attr in op.attributes.values():
                    t = attr.type.tensorType
                    if attr.type.HasField("tensorType") and t.rank == 2:
                        weight_dtypes.add(mil_dtypes.get(t.dataType, str(t.dataType)))
    return {
        "inputs": inputs,
        "outputs": outputs,
        "input_names": names.split(",") if names else [],
        "metadata": meta,
        "weight_dtypes": weight_dtypes,
    }


def export_all(
    model: Any,
    input_names: Sequence[str],
    out_dir: str | Path,
    name: str = "model",
    *,
    quantize: str | None = None,
    mean: np.ndarray | None = None,
    std: np.ndarray | None = None,
) -> dict[str, Path | str]:
    """Every format the backends load: ``{format: path}``, or ``{format: why not}``.

    ``coreml`` (``<name>.mlpackage``), ``npz`` and ``safetensors`` (MLX / numpy / torch).
    A model that is not a plain MLP still gets its Core ML package; one without
    coremltools still gets its weight files. ``quantize="int8"`` applies to Core ML and
    ``.npz`` (safetensors stays float32).
    """
    module = _load_module(model)
    leaves = [m for _, m in module.named_modules() if not list(m.children())]
    if (mean is not None or std is not None) and leaves and _kind(leaves[0]) == "Normalize":
        raise ConfigError("the module normalises its inputs already; do not pass mean/std")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Path | str] = {}
    try:
        spec, weights = spec_from_torch(module, input_names, mean=mean, std=std)
        storage: WeightStorage = "int8" if quantize == "int8" else "float32"
        result["npz"] = save_model(out / f"{name}.npz", spec, weights, storage=storage)
        result["safetensors"] = save_model(out / f"{name}.safetensors", spec, weights)
    except ConfigError as e:
        result["npz"] = result["safetensors"] = f"not exported: {e}"
    coreml_model = module
    if mean is not None or std is not None:
        from .torch_runner import Normalize

        torch = _torch()
        k = len(tuple(input_names))
        m = torch.from_numpy(np.asarray(mean if mean is not None else np.zeros(k), np.float32))
        s = torch.from_numpy(np.asarray(std if std is not None else np.ones(k), np.float32))
        coreml_model = torch.nn.Sequential(Normalize(m, s, torch.float32), module)
    try:
        result["coreml"] = export_coreml(
            coreml_model, input_names, out / f"{name}.mlpackage", quantize=quantize
        )
    except ConfigError as e:
        result["coreml"] = f"not exported: {e}"
    return result
