"""Export: Core ML packages (inspected on Linux), and MLP weights read back from torch modules."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from model_helpers import FP32_ATOL, SPEC, reference, rows, weights

from nautilus_pipeline.errors import ConfigError
from nautilus_pipeline.model.runners import make_runner

torch = pytest.importorskip("torch", reason="export needs torch")
ct = pytest.importorskip("coremltools", reason="Core ML export needs coremltools")

from nautilus_pipeline.model.export import (  # noqa: E402
    coreml_io,
    export_all,
    export_coreml,
    export_weights,
    spec_from_torch,
)
from nautilus_pipeline.model.spec import load_model  # noqa: E402
from nautilus_pipeline.model.torch_runner import build_torch_mlp  # noqa: E402

NAMES = tuple(f"f{i}" for i in range(12))
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)


def _user_mlp(act: type = torch.nn.ReLU) -> torch.nn.Module:
    """A model the way a user writes it: plain Sequential, no normalisation, Sigmoid last."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(12, 16),
        act(),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(16, 8),
        act(),
        torch.nn.Linear(8, 1),
        torch.nn.Sigmoid(),
    ).eval()


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("coreml")
    module = build_torch_mlp(SPEC, weights(1))
    return {
        "fp16": export_coreml(module, SPEC.input_names, d / "m.mlpackage"),
        "int8": export_coreml(
            module, SPEC.input_names, d / "q.mlpackage", quantize="int8", batch_sizes=(1, 32)
        ),
    }


def test_coreml_package_has_the_features_input_with_enumerated_batches(packages: dict) -> None:
    io = coreml_io(packages["fp16"])
    assert io["inputs"] == [
        {
            "name": "features",
            "dtype": "float32",
            "shape": (1, 50),
            "batch_sizes": (1, 8, 64, 256, 1024, 4096),
        }
    ]
    assert io["outputs"] == [{"name": "p_up", "dtype": "float32"}]
    assert io["input_names"] == list(SPEC.input_names)
    assert io["weight_dtypes"] == {"float16"}


def test_int8_coreml_package_stores_8_bit_weights(packages: dict) -> None:
    io = coreml_io(packages["int8"])
    assert io["weight_dtypes"] == {"int8"}
    assert io["inputs"][0]["batch_sizes"] == (1, 32)
    assert io["metadata"]["nautilus.quantize"] == "int8"
    size = lambda p: sum(f.stat().st_size for f in Path(p).rglob("*") if f.is_file())  # noqa: E731
    assert size(packages["int8"]) < size(packages["fp16"])


def test_coreml_normalisation_stays_float32_before_the_first_dense_layer(packages: dict) -> None:
    spec = ct.utils.load_spec(str(packages["fp16"]))
    ops = next(iter(next(iter(spec.mlProgram.functions.values())).block_specializations.values()))
    first_dense = next(i for i, op in enumerate(ops.operations) if op.type == "linear")
    before = {
        op.type: op.outputs[0].type.tensorType.dataType for op in ops.operations[:first_dense]
    }
    assert before["sub"] == before["mul"] == 11  # MIL FLOAT32


@pytest.mark.skipif(sys.platform == "darwin", reason="checks the non-macOS answer")
def test_coreml_predict_is_refused_off_macos_not_crashed(packages: dict) -> None:
    from nautilus_pipeline.errors import BackendUnavailableError

    with pytest.raises(BackendUnavailableError, match="Core ML prediction needs macOS"):
        make_runner("coreml:ane", SPEC, weights(1), coreml_package=packages["fp16"])


@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML prediction needs macOS")
def test_coreml_predicts_what_the_reference_does_on_macos(packages: dict) -> None:
    w = weights(1)
    x = rows(w, 5)
    got = make_runner("coreml:cpu", SPEC, w, coreml_package=packages["fp16"]).predict(x)
    np.testing.assert_allclose(got, reference(SPEC, w, x), atol=5e-3, rtol=0)


def test_a_bad_package_suffix_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\.mlpackage"):
        export_coreml(_user_mlp(), NAMES, tmp_path / "m.mlmodel")


@pytest.mark.parametrize("act", [torch.nn.ReLU, torch.nn.Tanh, torch.nn.SiLU])
def test_a_users_sequential_reads_back_as_the_same_function(act: type) -> None:
    module = _user_mlp(act)
    mean, std = np.linspace(-1, 1, 12), np.linspace(0.5, 2, 12)
    spec, w = spec_from_torch(module, NAMES, mean=mean, std=std)
    assert spec.layer_sizes == (12, 16, 8, 1)
    x = rows(w, 40)
    with torch.inference_mode():
        want = module(torch.from_numpy((x - w.mean) / w.std)).reshape(-1).numpy()
    np.testing.assert_allclose(make_runner("numpy", spec, w).predict(x), want, atol=FP32_ATOL)


def test_our_module_round_trips_through_torchscript_with_its_normalisation(tmp_path: Path) -> None:
    w = weights(2)
    path = tmp_path / "m.pt"
    torch.jit.script(build_torch_mlp(SPEC, w)).save(str(path))
    spec, w2 = spec_from_torch(path, SPEC.input_names)
    assert spec == SPEC
    np.testing.assert_array_equal(w2.mean, w.mean)
    np.testing.assert_array_equal(w2.weights[1], w.weights[1])


def test_export_weights_writes_a_loadable_safetensors_file(tmp_path: Path) -> None:
    path = export_weights(_user_mlp(), NAMES, tmp_path / "m.safetensors", metadata={"by": "test"})
    spec, w = load_model(path)
    assert spec.input_names == NAMES
    assert w.metadata == {"by": "test"}


def test_a_model_without_a_final_sigmoid_is_rejected() -> None:
    module = torch.nn.Sequential(torch.nn.Linear(12, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    with pytest.raises(ConfigError, match=r"must end in nn\.Sigmoid"):
        spec_from_torch(module, NAMES)


def test_a_model_that_is_not_a_plain_mlp_is_rejected_for_numpy_export() -> None:
    module = torch.nn.Sequential(
        torch.nn.Linear(12, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 1), torch.nn.Sigmoid()
    )
    with pytest.raises(ConfigError, match="only MLPs of Linear layers"):
        spec_from_torch(module, NAMES)


def test_a_forward_that_is_not_its_layer_chain_is_caught() -> None:
    class Skip(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.act, self.b, self.out = (
                torch.nn.Linear(12, 12),
                torch.nn.ReLU(),
                torch.nn.Linear(12, 1),
                torch.nn.Sigmoid(),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.b(self.act(self.a(x)) + x))  # residual: not a plain chain

    with pytest.raises(ConfigError, match="do not reproduce its output"):
        spec_from_torch(Skip(), NAMES)


def test_input_names_must_match_the_first_layer() -> None:
    with pytest.raises(ConfigError, match="takes 12 inputs, 3 names"):
        spec_from_torch(_user_mlp(), ("a", "b", "c"))


def test_export_all_writes_every_format_with_the_normalisation_folded_in(tmp_path: Path) -> None:
    module = _user_mlp()
    mean, std = np.linspace(100, 200, 12), np.linspace(1, 3, 12)
    paths = export_all(module, NAMES, tmp_path, "m", mean=mean, std=std)
    assert {k: Path(v).name for k, v in paths.items()} == {
        "npz": "m.npz",
        "safetensors": "m.safetensors",
        "coreml": "m.mlpackage",
    }
    spec, w = load_model(paths["npz"])
    x = (np.random.default_rng(3).standard_normal((20, 12)) * std + mean).astype(np.float32)
    with torch.inference_mode():
        want = module(torch.from_numpy(((x - mean) / std).astype(np.float32))).reshape(-1).numpy()
    np.testing.assert_allclose(make_runner("numpy", spec, w).predict(x), want, atol=FP32_ATOL)
    ops = [
        op.type
        for op in next(
            iter(
                next(
                    iter(ct.utils.load_spec(str(paths["coreml"])).mlProgram.functions.values())
                ).block_specializations.values()
            )
        ).operations
    ]
    assert ops.index("sub") < ops.index("linear")  # the normalisation went into the package


def test_export_all_still_writes_core_ml_for_a_model_that_is_not_an_mlp(tmp_path: Path) -> None:
    module = torch.nn.Sequential(
        torch.nn.Linear(12, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 1), torch.nn.Sigmoid()
    )
    paths = export_all(module, NAMES, tmp_path, "ln")
    assert str(paths["npz"]).startswith("not exported: only MLPs")
    assert coreml_io(paths["coreml"])["inputs"][0]["shape"] == (1, 12)


def test_export_script_exports_a_torchscript_file(tmp_path: Path) -> None:
    import subprocess

    model = tmp_path / "user.pt"
    torch.jit.script(_user_mlp()).save(str(model))
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [
            sys.executable,
            str(repo / "scripts" / "export_model.py"),
            str(model),
            "--inputs",
            ",".join(NAMES),
            "--out-dir",
            str(tmp_path / "out"),
            "--quantize",
            "int8",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "user.mlpackage").is_dir()
    spec, _ = load_model(tmp_path / "out" / "user.npz")
    assert spec.input_names == NAMES
    # coremltools leaves the 1×8 output layer float16 (too small to quantize), the rest is int8
    assert "int8" in coreml_io(tmp_path / "out" / "user.mlpackage")["weight_dtypes"]
