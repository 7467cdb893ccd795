"""Train the default model shipped in ``nautilus_pipeline/models/default_mlp.npz``.

What it is: an MLP over the default trade features (``FEATURE_NAMES``, computed by
``nautilus_pipeline.analytics.features_frame``) → 128 → 64 → 32 → 1 (sigmoid), predicting
whether the trade price ``N`` trades ahead is above the current one. It exists so that the
default pipeline runs out of the box and exercises inference end to end; it is **not** a
trading model, and its out-of-sample accuracy (printed, near 50 %) says so.

Data: every Binance trade stream in ``../shared/data`` (two trade CSVs and the trades of the
three feed captures not already covered by a CSV): ~54K trades over ~6 minutes per symbol.
Each symbol is split in time: the first 70 % trains (its last fifth validates, choosing the
epoch: the model overfits six minutes of data within a few epochs), the last 30 % tests;
rows whose label window reaches into the next part are dropped (no look-ahead). Rows where the
price does not move over the horizon carry no sign and are dropped from both parts; rows
with a NaN feature (RSI warm-up) too. The normalisation (mean/std per feature) comes from
the fitting rows and is saved inside the model, so the pipeline feeds raw features.

Reproducible: fixed seed, one torch thread, deterministic algorithms; running it twice
writes the same weights.

    .venv/bin/python scripts/train_default_model.py [--horizon 100] [--seed 7] [--epochs 30]
"""

from __future__ import annotations

import argparse
import copy
import gzip
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nautilus_pipeline.analytics import features_frame  # noqa: E402
from nautilus_pipeline.kernels.features import FEATURE_NAMES  # noqa: E402
from nautilus_pipeline.model.spec import MLPWeights, ModelSpec, load_model, save_model  # noqa: E402
from nautilus_pipeline.model.torch_runner import build_torch_mlp  # noqa: E402

DATA = REPO.parent / "shared" / "data"
OUT = REPO / "nautilus_pipeline" / "models" / "default_mlp.npz"
TRAIN_FRACTION = 0.7
VALID_FRACTION = 0.2  # of the training part, its last stretch: picks the epoch

Trades = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # ts_ns, price, size, side


def read_binance_csv(path: Path) -> Trades:
    """Binance public trades CSV (spot: no header; USD-M: header); side from ``is_buyer_maker``."""
    with path.open() as fh:
        first = fh.readline()
    header = first.startswith("id,")
    raw = np.genfromtxt(path, delimiter=",", dtype=str, skip_header=1 if header else 0)
    price = raw[:, 1].astype(np.float64)
    size = raw[:, 2].astype(np.float64)
    ts_ns = raw[:, 4].astype(np.int64) * 1_000_000
    buyer_maker = np.char.lower(raw[:, 5]) == "true"
    side = np.where(buyer_maker, -1, 1).astype(np.int8)  # buyer is maker: seller aggressed
    return ts_ns, price, size, side


def read_feed_trades(path: Path) -> Trades:
    """Trades of a Binance websocket capture (``<recv ns> <JSON>`` per line)."""
    ts, px, sz, sd = [], [], [], []
    with gzip.open(path, "rt") as fh:
        for line in fh:
            if "@trade" not in line:
                continue
            d = json.loads(line.split(" ", 1)[1])["data"]
            ts.append(int(d["T"]) * 1_000_000)
            px.append(float(d["p"]))
            sz.append(float(d["q"]))
            sd.append(-1 if d["m"] else 1)
    return np.array(ts), np.array(px), np.array(sz), np.array(sd, dtype=np.int8)


SOURCES: tuple[tuple[str, str], ...] = (
    ("BTCUSDT-PERP", "binance-um-btcusdt-trades-20240808.csv"),
    ("ETHUSDT-SPOT", "binance-spot-ethusdt-trades-20240808.csv"),
    ("ETHUSDT-PERP", "binance-feed-usdm-ethusdt_20240808.jsonl.gz"),
    ("BTCUSDT-SPOT", "binance-feed-spot-btcusdt_20240808.jsonl.gz"),
    ("BTCUSD-CM", "binance-feed-cm-btcusd_perp_20240809.jsonl.gz"),
)


def symbol_rows(trades: Trades, horizon: int) -> dict[str, np.ndarray]:
    """Features, label and train/test mask for one symbol's trades (rows with a label only)."""
    ts, price, size, side = trades
    order = np.argsort(ts, kind="stable")
    ts, price, size, side = ts[order], price[order], size[order], side[order]
    frame = features_frame(ts, price, size, side)
    x = np.column_stack([frame[name] for name in FEATURE_NAMES])
    n = len(price)
    idx = np.arange(n - horizon)
    move = price[idx + horizon] - price[idx]
    split = int(n * TRAIN_FRACTION)
    fit_end = int(split * (1 - VALID_FRACTION))
    is_fit = idx + horizon < fit_end  # label windows end before the next part starts
    is_valid = (idx >= fit_end) & (idx + horizon < split)
    is_test = idx >= split
    keep = (move != 0) & np.all(np.isfinite(x[idx]), axis=1) & (is_fit | is_valid | is_test)
    return {
        "x": x[idx][keep],
        "y": (move[keep] > 0).astype(np.float32),
        "part": np.select([is_fit, is_valid], [0, 1], 2)[keep],
    }


def train(
    x: np.ndarray,
    y: np.ndarray,
    xv: np.ndarray,
    yv: np.ndarray,
    spec: ModelSpec,
    mean: np.ndarray,
    std: np.ndarray,
    *,
    seed: int,
    epochs: int,
    batch: int = 256,
    lr: float = 3e-4,
    weight_decay: float = 1e-3,
) -> tuple[torch.nn.Sequential, int]:
    """Adam on binary cross-entropy (logits); keeps the epoch with the best validation loss.

    Returns the module (with its sigmoid) and the chosen epoch (0 = the initial weights).
    """
    torch.manual_seed(seed)
    model = build_torch_mlp(spec, MLPWeights(mean, std, *_init(spec, seed)))
    logits = model[:-1]
    opt = torch.optim.AdamW(logits.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    xt, yt = torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y)
    xvt, yvt = torch.from_numpy(xv.astype(np.float32)), torch.from_numpy(yv)
    gen = torch.Generator().manual_seed(seed)

    def valid_loss() -> float:
        with torch.inference_mode():
            return float(loss_fn(logits(xvt).reshape(-1), yvt))

    best, best_epoch, best_state = valid_loss(), 0, copy.deepcopy(model.state_dict())
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), batch):
            j = perm[i : i + batch]
            opt.zero_grad()
            loss = loss_fn(logits(xt[j]).reshape(-1), yt[j])
            loss.backward()
            opt.step()
        v = valid_loss()
        if v < best:
            best, best_epoch, best_state = v, epoch, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return model.eval(), best_epoch


def _init(spec: ModelSpec, seed: int) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """torch's default Linear init, drawn from a seeded generator."""
    torch.manual_seed(seed)
    sizes = spec.layer_sizes
    layers = [torch.nn.Linear(a, b) for a, b in itertools.pairwise(sizes)]
    return (
        tuple(m.weight.detach().numpy().copy() for m in layers),
        tuple(m.bias.detach().numpy().copy() for m in layers),
    )


def weights_of(model: torch.nn.Sequential, mean: np.ndarray, std: np.ndarray) -> MLPWeights:
    dense = [m for m in model if isinstance(m, torch.nn.Linear)]
    return MLPWeights(
        mean,
        std,
        tuple(m.weight.detach().numpy().copy() for m in dense),
        tuple(m.bias.detach().numpy().copy() for m in dense),
    )


def log_loss(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--horizon", type=int, default=100, help="N: label = sign of the move N trades ahead"
    )
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    t0 = time.perf_counter()

    parts, per_symbol = [], {}
    for symbol, name in SOURCES:
        path = DATA / name
        trades = read_binance_csv(path) if name.endswith(".csv") else read_feed_trades(path)
        rows = symbol_rows(trades, args.horizon)
        rows["symbol"] = np.full(len(rows["y"]), symbol)
        parts.append(rows)
        per_symbol[symbol] = {"file": name, "trades": len(trades[0])}
    x = np.concatenate([p["x"] for p in parts])
    y = np.concatenate([p["y"] for p in parts])
    part = np.concatenate([p["part"] for p in parts])
    is_fit, is_valid, is_train = part == 0, part == 1, part < 2
    symbols = np.concatenate([p["symbol"] for p in parts])

    mean = x[is_fit].mean(axis=0)
    std = x[is_fit].std(axis=0)
    std = np.where(std > 0, std, 1.0)
    spec = ModelSpec(FEATURE_NAMES, hidden=(128, 64, 32), activation="relu")
    model, epoch = train(
        x[is_fit],
        y[is_fit],
        x[is_valid],
        y[is_valid],
        spec,
        mean,
        std,
        seed=args.seed,
        epochs=args.epochs,
    )
    with torch.inference_mode():
        p = model(torch.from_numpy(x.astype(np.float32))).reshape(-1).numpy()

    def report(mask: np.ndarray) -> dict[str, float]:
        yy, pp = y[mask], p[mask]
        up = float(yy.mean())
        return {
            "rows": int(mask.sum()),
            "accuracy": round(float(np.mean((pp > 0.5) == (yy > 0.5))), 4),
            "majority_baseline": round(max(up, 1 - up), 4),
            "log_loss": round(log_loss(pp, yy), 4),
            "log_loss_constant": round(log_loss(np.full_like(pp, np.mean(y[is_fit])), yy), 4),
        }

    test = ~is_train
    result = {"fit": report(is_fit), "valid": report(is_valid), "test": report(test)}
    for symbol in per_symbol:
        per_symbol[symbol]["test"] = report(test & (symbols == symbol))

    weights = weights_of(model, mean, std)
    card = {
        "model": "default_mlp",
        "purpose": "exercises the pipeline's inference stage; not a trading model",
        "inputs": list(FEATURE_NAMES),
        "layers": list(spec.layer_sizes),
        "activation": spec.activation,
        "output": "p_up: probability that the trade price N trades ahead is above the current one",
        "horizon_trades": args.horizon,
        "label": "1 if price[t+N] > price[t], 0 if below; rows with no move dropped",
        "split": f"per symbol in time: first {TRAIN_FRACTION:.0%} train (its last "
        f"{VALID_FRACTION:.0%} validation), last {1 - TRAIN_FRACTION:.0%} test; label windows "
        "never cross a boundary",
        "seed": args.seed,
        "epochs_max": args.epochs,
        "epoch_chosen": epoch,
        "optimizer": "AdamW lr=3e-4 weight_decay=1e-3 batch=256, BCE on logits; "
        "epoch with the best validation log loss",
        "torch": torch.__version__,
        "data": per_symbol,
        "results": result,
        "n_params": weights.n_params,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_model(args.out, spec, weights, card)
    spec2, w2 = load_model(args.out)
    assert spec2 == spec and np.array_equal(w2.weights[0], weights.weights[0])
    card_path = args.out.with_suffix(".json")
    card_path.write_text(json.dumps(card, indent=2) + "\n")

    print(f"features: {len(FEATURE_NAMES)} ({', '.join(FEATURE_NAMES)})")
    print(
        f"horizon N = {args.horizon} trades, seed {args.seed}, epoch {epoch} of {args.epochs} "
        "kept (best validation log loss), "
        f"{weights.n_params} parameters, {time.perf_counter() - t0:.1f} s"
    )
    print(f"{'part':<14}{'rows':>8}{'accuracy':>10}{'majority':>10}{'logloss':>9}{'const':>8}")
    rows_out = [(k, result[k]) for k in ("fit", "valid", "test")]
    rows_out += [(f"test {s}", d["test"]) for s, d in per_symbol.items()]
    for label, r in rows_out:
        print(
            f"{label:<14}{r['rows']:>8}{r['accuracy']:>10.4f}{r['majority_baseline']:>10.4f}"
            f"{r['log_loss']:>9.4f}{r['log_loss_constant']:>8.4f}"
        )
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.1f} KiB) and {card_path}")


if __name__ == "__main__":
    main()
