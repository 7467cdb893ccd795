"""Export a torch model to Core ML (.mlpackage) and to .npz / safetensors for MLX and numpy.

    .venv/bin/python scripts/export_model.py model.pt --inputs default --out-dir out/ \
        [--name my_model] [--quantize int8] [--stats stats.npz]

``model.pt`` is a TorchScript file (``torch.jit.script(m).save(...)``) whose output is the
probability of an up move, shape ``[n, 1]`` or ``[n]``. ``--inputs`` names its input
features in column order: ``default`` (the default features stage's ``FEATURE_NAMES``), a
comma-separated list, or a text file with one name per line. ``--stats`` is an ``.npz``
with ``mean`` and ``std`` arrays when the model expects normalised inputs: they are folded
into every exported format so the pipeline can feed raw features. Conversion runs on
Linux; only Core ML prediction needs macOS.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nautilus_pipeline.model.export import export_all


def input_names(arg: str) -> tuple[str, ...]:
    """``default``, ``a,b,c`` or a file with one name per line."""
    if arg == "default":
        from nautilus_pipeline.kernels.features import FEATURE_NAMES

        return FEATURE_NAMES
    path = Path(arg)
    if path.is_file():
        return tuple(n.strip() for n in path.read_text().splitlines() if n.strip())
    return tuple(n.strip() for n in arg.split(",") if n.strip())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path, help="TorchScript file")
    ap.add_argument("--inputs", required=True, help="'default', 'a,b,c' or a names file")
    ap.add_argument("--out-dir", type=Path, required=True)
    ap.add_argument("--name", default=None, help="file stem (default: the model's)")
    ap.add_argument("--quantize", choices=["int8"], default=None)
    ap.add_argument("--stats", type=Path, help=".npz with mean and std of the raw features")
    args = ap.parse_args()
    mean = std = None
    if args.stats:
        with np.load(args.stats) as z:
            mean, std = z["mean"], z["std"]
    result = export_all(
        args.model,
        input_names(args.inputs),
        args.out_dir,
        args.name or args.model.stem,
        quantize=args.quantize,
        mean=mean,
        std=std,
    )
    for fmt, where in result.items():
        print(f"{fmt:<12} {where}")
    if not any(isinstance(v, Path) for v in result.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
