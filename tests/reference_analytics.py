"""Plain references for the analytics kernels: one tick at a time, float64, obvious, slow.

Written from the definitions in issue 4 and the kernels' docstrings, not from the fast
code: Python floats and loops, ``math`` and ``statistics``; numpy only to hand arrays back.
The tests compare the fast kernels against these.
"""

from __future__ import annotations

import math
import statistics

import numpy as np

# --------------------------------------------------------------------------- data


def load_binance_um_trades(path: str) -> dict[str, np.ndarray]:
    """The trades of a Binance USD-M trades CSV as tick columns (test input, not a reference).

    Header ``id,price,qty,quote_qty,time,is_buyer_maker``; ``time`` in ms; buyer-maker
    means the seller was the aggressor (side −1).
    """
    import pyarrow.csv as pacsv

    t = pacsv.read_csv(path)
    maker = t["is_buyer_maker"].to_numpy(zero_copy_only=False)
    return {
        "ts_ns": t["time"].to_numpy().astype(np.int64) * 1_000_000,
        "price": t["price"].to_numpy().astype(np.float64),
        "size": t["qty"].to_numpy().astype(np.float64),
        "side": np.where(maker, -1, 1).astype(np.int8),
    }


def random_splits(n: int, rng: np.random.Generator, max_size: int = 4096) -> list[tuple[int, int]]:
    """Cut range(n) into consecutive batches of random sizes 1..max_size."""
    out, lo = [], 0
    while lo < n:
        hi = min(n, lo + int(rng.integers(1, max_size + 1)))
        out.append((lo, hi))
        lo = hi
    return out


def generated_trades(n: int, seed: int) -> dict[str, np.ndarray]:
    """A seeded synthetic trade stream with the real data's quirks.

    Like the BTCUSDT USD-M file: prices on a 0.1 tick grid with 64% zero price changes
    (36% in the file), 75% of timestamps equal to the previous one (sweeps), some zero
    sizes and unknown sides, and occasional gaps of minutes.
    """
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(6e7, n)
    gaps[rng.random(n) < 0.75] = 0.0
    gaps[rng.random(n) < 0.002] = 3e11
    ts = 1_723_161_256_000_000_000 + np.cumsum(gaps).astype(np.int64)
    steps = rng.choice([-3, -1, 0, 1, 3], n, p=[0.04, 0.14, 0.64, 0.14, 0.04])
    price = 60_000.0 + 0.1 * np.cumsum(steps)
    size = np.round(rng.exponential(0.2, n), 3)
    side = rng.choice(np.array([-1, 0, 1], dtype=np.int8), n, p=[0.45, 0.1, 0.45])
    return {"ts_ns": ts, "price": price, "size": size, "side": side}


# --------------------------------------------------------------------------- features


def ref_features(
    ts_ns: list[int],
    price: list[float],
    size: list[float],
    side: list[int],
    half_lives: tuple[int, ...] = (10, 100, 1000),
    intensity_half_life: int = 100,
    vwap_half_life: int = 100,
    rsi_period: int = 14,
) -> np.ndarray:
    """Trade features of one symbol, one row per trade, columns as ``feature_names``."""
    decay = {h: 0.5 ** (1.0 / h) for h in (*half_lives, intensity_half_life, vwap_half_life)}
    ew_r = dict.fromkeys(half_lives, 0.0)
    ew_r2 = dict.fromkeys(half_lives, 0.0)
    ew_sv = dict.fromkeys(half_lives, 0.0)
    ew_v = dict.fromkeys(half_lives, 0.0)
    ew_dt = 0.0
    ew_pv = 0.0
    ew_vv = 0.0
    n_changes = 0
    sum_gain = sum_loss = 0.0
    avg_gain = avg_loss = 0.0
    rows = []
    for i in range(len(price)):
        p, v, t = float(price[i]), float(size[i]), int(ts_ns[i])
        if i == 0:
            r, dt, change = 0.0, 0.0, None
        else:
            r = math.log(p / float(price[i - 1]))
            dt = max(t - int(ts_ns[i - 1]), 0) / 1e9
            change = p - float(price[i - 1])
        row = [r]
        for h in half_lives:
            a = decay[h]
            ew_r[h] = (1.0 - a) * r + a * ew_r[h]
            ew_r2[h] = (1.0 - a) * (r * r) + a * ew_r2[h]
            ew_sv[h] = (1.0 - a) * (float(side[i]) * v) + a * ew_sv[h]
            ew_v[h] = (1.0 - a) * v + a * ew_v[h]
        row += [ew_r[h] for h in half_lives]
        row += [math.sqrt(ew_r2[h]) for h in half_lives]
        row += [ew_sv[h] / ew_v[h] if ew_v[h] != 0.0 else math.nan for h in half_lives]
        a = decay[intensity_half_life]
        ew_dt = (1.0 - a) * dt + a * ew_dt
        row.append(ew_dt)
        rsi = math.nan
        if change is not None:
            n_changes += 1
            gain, loss = max(change, 0.0), max(-change, 0.0)
            if n_changes <= rsi_period:
                sum_gain += gain
                sum_loss += loss
                if n_changes == rsi_period:
                    avg_gain, avg_loss = sum_gain / rsi_period, sum_loss / rsi_period
            else:
                w = 1.0 - 1.0 / rsi_period
                avg_gain = (1.0 / rsi_period) * gain + w * avg_gain
                avg_loss = (1.0 / rsi_period) * loss + w * avg_loss
            if n_changes >= rsi_period:
                total = avg_gain + avg_loss
                rsi = 100.0 * avg_gain / total if total > 0.0 else 50.0
        row.append(rsi)
        a = decay[vwap_half_life]
        ew_pv = (1.0 - a) * (p * v) + a * ew_pv
        ew_vv = (1.0 - a) * v + a * ew_vv
        row.append(math.log(p / (ew_pv / ew_vv)) if ew_vv != 0.0 else math.nan)
        rows.append(row)
    return np.array(rows, dtype=np.float64).reshape(len(price), -1)


def ref_quote_features(bid: float, ask: float, bid_size: float, ask_size: float) -> list[float]:
    """Spread, microprice minus mid, top-of-book size imbalance of one quote."""
    depth = bid_size + ask_size
    micro = (bid * ask_size + ask * bid_size) / depth
    return [ask - bid, micro - (bid + ask) / 2.0, (bid_size - ask_size) / depth]


# --------------------------------------------------------------------------- VPIN


def ref_vpin(
    ts_ns: list[int],
    price: list[float],
    size: list[float],
    *,
    bucket_volume: float,
    window: int = 50,
    bar_ns: int = 60_000_000_000,
    sigma_window: int = 100,
    threshold: float = 0.9,
) -> dict[str, np.ndarray]:
    """VPIN per completed bucket of a whole stream, end of stream included (issue 4)."""
    # bars: [ts, price, volume, row of the trade whose arrival closed it (-1: end of stream)]
    bars: list[list] = []
    open_id = None
    for i, (t, p, v) in enumerate(zip(ts_ns, price, size, strict=True)):
        t, p, v = int(t), float(p), float(v)
        if bar_ns == 0:
            bars.append([t, p, v, i])
            continue
        bar_id = t // bar_ns
        if open_id is not None and bar_id <= open_id:
            bars[-1][0] = t
            bars[-1][1] = p
            bars[-1][2] += v
        else:
            if bars:
                bars[-1][3] = i
            bars.append([t, p, v, -1])
            open_id = bar_id

    V = bucket_volume
    dps: list[float] = []
    out: dict[str, list] = {
        k: []
        for k in ("bucket", "ts_ns", "buy_volume", "sell_volume", "vpin", "cdf", "toxic", "row")
    }
    ois: list[float] = []
    vpins: list[float] = []
    cum = 0.0
    j = 0
    buy = 0.0
    for k, (t, p, v, closed_at) in enumerate(bars):
        if k == 0:
            f = 0.5
        else:
            dp = p - bars[k - 1][1]
            dps.append(dp)
            last = dps[-sigma_window:]
            sigma = statistics.stdev(last) if len(last) >= 2 else 0.0
            f = 0.5 * math.erfc(-(dp / sigma) / math.sqrt(2.0)) if sigma > 0.0 else 0.5
        lo = cum
        cum = cum + v
        hi = cum
        while hi >= (j + 1) * V:
            buy += f * ((j + 1) * V - max(lo, j * V))
            oi = abs(2.0 * buy - V)
            ois.append(oi)
            vpin = sum(ois[-window:]) / (window * V) if len(ois) >= window else math.nan
            if math.isnan(vpin):
                cdf = math.nan
            else:
                vpins.append(vpin)
                cdf = sum(1 for x in vpins if x <= vpin) / len(vpins)
            out["bucket"].append(j)
            out["ts_ns"].append(t)
            out["buy_volume"].append(buy)
            out["sell_volume"].append(V - buy)
            out["vpin"].append(vpin)
            out["cdf"].append(cdf)
            out["toxic"].append(cdf > threshold)
            out["row"].append(closed_at)
            j += 1
            buy = 0.0
        if hi > j * V:
            buy += f * (hi - max(lo, j * V))
    dtypes = {"bucket": np.int64, "ts_ns": np.int64, "toxic": bool, "row": np.int64}
    return {k: np.array(v, dtype=dtypes.get(k, np.float64)) for k, v in out.items()}


# --------------------------------------------------------------------------- risk


def ref_risk(
    ts_ns: list[int],
    price: list[float],
    target: list[float],
    *,
    max_position: float = math.inf,
    max_notional: float = math.inf,
    max_drawdown: float = math.inf,
    max_orders: int = 0,
    order_window_ns: int = 1_000_000_000,
    fee_rate: float = 0.0,
    fee_per_order: float = 0.0,
    initial_cash: float = 0.0,
) -> dict[str, np.ndarray]:
    """The simulated account, one trade at a time, per the rules in the risk module's docstring."""
    position, cash, pending = 0.0, initial_cash, None
    peak = initial_cash
    kill = False
    accepted: list[int] = []  # timestamps of accepted orders
    rows = []
    for t, p, tgt in zip(ts_ns, price, target, strict=True):
        fill_q, fill_p = 0.0, math.nan
        if pending is not None:
            q = pending - position
            if q != 0.0:
                cash -= q * p + fee_rate * abs(q) * p + fee_per_order
                position = pending
                fill_q, fill_p = q, p
            pending = None
        equity = cash + position * p
        peak = max(peak, equity)
        dd = peak - equity
        breach = 0
        if abs(position) > max_position:
            breach |= 1
        if abs(position) * p > max_notional:
            breach |= 2
        if dd > max_drawdown:
            breach |= 4
        if not kill and breach == 0 and not math.isnan(tgt) and tgt != position:
            if abs(tgt) > max_position:
                breach |= 1
            if abs(tgt) * p > max_notional:
                breach |= 2
            if breach == 0 and max_orders > 0:
                recent = [a for a in accepted if t - a < order_window_ns]
                if len(recent) + 1 > max_orders:
                    breach |= 8
                else:
                    accepted.append(t)
            if breach == 0:
                pending = tgt
        if breach:
            kill = True
        if kill:
            pending = 0.0 if position != 0.0 else None
        rows.append(
            (position, cash, equity, equity - initial_cash, dd, fill_q, fill_p, kill, breach)
        )
    cols = list(zip(*rows, strict=True)) if rows else [[] for _ in range(9)]
    names = (
        "position",
        "cash",
        "equity",
        "pnl",
        "drawdown",
        "fill_qty",
        "fill_price",
        "kill",
        "breach",
    )
    dtypes = {"kill": bool, "breach": np.int64}
    return {
        k: np.array(c, dtype=dtypes.get(k, np.float64)) for k, c in zip(names, cols, strict=True)
    }


def ref_parametric_var(sigma: float, exposure: float, horizon: int, level: float) -> float:
    """Closed-form delta-normal VaR: z_level · sigma · sqrt(horizon) · |exposure|."""
    return statistics.NormalDist().inv_cdf(level) * sigma * math.sqrt(horizon) * abs(exposure)


def ref_historical_var(returns: list[float], exposure: float, level: float) -> float:
    """Sort the losses; the VaR is the ceil(level·n)-th smallest."""
    losses = sorted(-exposure * r for r in returns)
    k = math.ceil(level * len(losses))
    return losses[max(k, 1) - 1]


# --------------------------------------------------------------------------- signal


def ref_signal(
    prob: list[float],
    toxic: list[bool],
    kill: list[bool],
    *,
    long_threshold: float = 0.55,
    short_threshold: float = 0.45,
    max_position: float = 1.0,
    sizing: str = "fixed",
    step_aside_on_toxic: bool = True,
) -> list[tuple[int, float, float, tuple[str, ...], bool]]:
    """(side, strength, target, reasons, emit) per row, per the signal module's rule."""
    last_prob = math.nan
    last = None
    out = []
    for pr, tx, kl in zip(prob, toxic, kill, strict=True):
        if not math.isnan(pr):
            last_prob = pr
        reasons = []
        side, strength = 0, 0.0
        if math.isnan(last_prob):
            reasons.append("no_model")
        elif last_prob >= long_threshold:
            side, strength = 1, abs(2.0 * last_prob - 1.0)
            reasons.append("model_long")
        elif last_prob <= short_threshold:
            side, strength = -1, abs(2.0 * last_prob - 1.0)
            reasons.append("model_short")
        else:
            reasons.append("model_neutral")
        if tx and step_aside_on_toxic:
            side, strength = 0, 0.0
            reasons.append("toxic_flow")
        if kl:
            side, strength = 0, 0.0
            reasons.append("risk_kill_switch")
        target = side * max_position if sizing == "fixed" else side * strength * max_position
        target = float(target) + 0.0
        emit = last is None or (side, target) != last
        last = (side, target)
        out.append((side, strength, target, tuple(reasons), emit))
    return out


# --------------------------------------------------------------------------- portfolio


def _ref_jacobi_eigh(a: list[list[float]]) -> tuple[list[float], list[list[float]]]:
    """Eigenvalues and eigenvectors (columns) of a symmetric matrix by cyclic Jacobi rotations."""
    n = len(a)
    a = [row[:] for row in a]
    v = [[1.0 if i == j else 0.0 for j in range(n)] for i in range(n)]
    for _ in range(100):
        off = sum(a[i][j] ** 2 for i in range(n) for j in range(n) if i != j)
        scale = sum(a[i][j] ** 2 for i in range(n) for j in range(n))
        if off <= 1e-36 * scale or off == 0.0:
            break
        for p in range(n - 1):
            for q in range(p + 1, n):
                if a[p][q] == 0.0:
                    continue
                theta = (a[q][q] - a[p][p]) / (2.0 * a[p][q])
                t = math.copysign(1.0, theta) / (abs(theta) + math.sqrt(theta * theta + 1.0))
                c = 1.0 / math.sqrt(t * t + 1.0)
                s = t * c
                for k in range(n):
                    akp, akq = a[k][p], a[k][q]
                    a[k][p] = c * akp - s * akq
                    a[k][q] = s * akp + c * akq
                for k in range(n):
                    apk, aqk = a[p][k], a[q][k]
                    a[p][k] = c * apk - s * aqk
                    a[q][k] = s * apk + c * aqk
                for k in range(n):
                    vkp, vkq = v[k][p], v[k][q]
                    v[k][p] = c * vkp - s * vkq
                    v[k][q] = s * vkp + c * vkq
    return [a[i][i] for i in range(n)], v


def _ref_solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting."""
    n = len(a)
    m = [[*a[i], b[i]] for i in range(n)]
    for c in range(n):
        piv = max(range(c, n), key=lambda r: abs(m[r][c]))
        m[c], m[piv] = m[piv], m[c]
        for r in range(c + 1, n):
            f = m[r][c] / m[c][c]
            for k in range(c, n + 1):
                m[r][k] -= f * m[c][k]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (m[r][n] - sum(m[r][k] * x[k] for k in range(r + 1, n))) / m[r][r]
    return x


def ref_portfolio(
    ts_ns: list[int],
    symbol: list[str],
    price: list[float],
    *,
    bar_ns: int,
    window: int,
    ridge: float = 0.0,
    levels: tuple[float, ...] = (0.95, 0.99),
    horizon_bars: int = 1,
    target_weights: list[float] | None = None,
    symbols: list[str] | None = None,
) -> dict:
    """Issue 17's portfolio per output bar, end of stream included: one trade at a time.

    ``symbols`` fixes the portfolio (default: the sorted names seen). Returns lists per bar:
    ``ts_ns``, ``row`` (trade that closed the bar, −1 at the end), ``mean``, ``cov``, ``corr``,
    ``eigenvalues``, ``eigenvectors`` (columns), ``explained_variance``, ``weights_min_var``,
    ``singular``, ``variance_*``, ``var_*`` (one value per level).
    """
    names = sorted(set(symbol)) if symbols is None else list(symbols)
    index = {s: j for j, s in enumerate(names)}
    n = len(names)
    closes: list[float | None] = [None] * n
    bars: list[tuple[int, list[float], int]] = []  # (bar end, closes, row that closed it)
    open_id = None
    for i, (t, s, p) in enumerate(zip(ts_ns, symbol, price, strict=True)):
        if s not in index:
            continue
        bar_id = int(t) // bar_ns
        if open_id is not None and bar_id <= open_id:
            closes[index[s]] = float(p)
            continue
        if open_id is not None and all(c is not None for c in closes):
            bars.append(((open_id + 1) * bar_ns, list(closes), i))
        open_id = bar_id
        closes[index[s]] = float(p)
    if open_id is not None and all(c is not None for c in closes):
        bars.append(((open_id + 1) * bar_ns, list(closes), -1))

    z = [statistics.NormalDist().inv_cdf(lv) for lv in levels]
    eps = 2.0**-52
    target = [1.0 / n] * n if target_weights is None else [float(x) for x in target_weights]
    keys = ("ts_ns", "row", "mean", "cov", "corr", "eigenvalues", "eigenvectors",
            "explained_variance", "weights_min_var", "singular", "variance_min_var",
            "variance_equal", "variance_target", "var_min_var", "var_equal", "var_target")
    out: dict[str, list] = {k: [] for k in keys}
    rets: list[list[float]] = []
    for k in range(1, len(bars)):
        rets.append([math.log(bars[k][1][j] / bars[k - 1][1][j]) for j in range(n)])
        if len(rets) < window:
            continue
        win = rets[-window:]
        mean = []
        for j in range(n):
            s = 0.0
            for row in win:
                s += row[j]
            mean.append(s / window)
        cov = [[0.0] * n for _ in range(n)]
        for a in range(n):
            for b in range(a, n):
                s = 0.0
                for row in win:
                    s += (row[a] - mean[a]) * (row[b] - mean[b])
                cov[a][b] = cov[b][a] = s / (window - 1)
        corr = [[cov[a][b] / math.sqrt(cov[a][a] * cov[b][b])
                 if cov[a][a] > 0.0 and cov[b][b] > 0.0 else math.nan for b in range(n)]
                for a in range(n)]
        lam, vec = _ref_jacobi_eigh(cov)
        order = sorted(range(n), key=lambda c: -lam[c])
        lam = [lam[c] for c in order]
        cols = []
        for c in order:
            col = [vec[r][c] for r in range(n)]
            big = max(range(n), key=lambda r: (abs(col[r]), -r))
            if col[big] < 0.0:
                col = [-x for x in col]
            cols.append(col)
        vecs = [[cols[c][r] for c in range(n)] for r in range(n)]
        total = sum(lam)
        explained = [x / total if total != 0.0 else math.nan for x in lam]
        delta = ridge * sum(cov[j][j] for j in range(n)) / n
        lam_r = [x + delta for x in lam]
        singular = not lam_r[-1] > n * eps * lam_r[0]
        if singular:
            w = [math.nan] * n
        else:
            cov_r = [[cov[a][b] + (delta if a == b else 0.0) for b in range(n)] for a in range(n)]
            x = _ref_solve(cov_r, [1.0] * n)
            w = [xi / sum(x) for xi in x]

        def quad(wv: list[float], cov=cov) -> float:
            return sum(wv[a] * cov[a][b] * wv[b] for a in range(n) for b in range(n))

        v_mv = math.nan if singular else quad(w)
        v_eq, v_tg = quad([1.0 / n] * n), quad(target)
        for name, value in (("variance_min_var", v_mv), ("variance_equal", v_eq),
                            ("variance_target", v_tg)):
            out[name].append(value)
            out["var" + name.removeprefix("variance")].append(
                [zz * math.sqrt(horizon_bars * value) if value >= 0.0 else math.nan for zz in z]
            )
        for name, value in (("ts_ns", bars[k][0]), ("row", bars[k][2]), ("mean", mean),
                            ("cov", cov), ("corr", corr), ("eigenvalues", lam),
                            ("eigenvectors", vecs), ("explained_variance", explained),
                            ("weights_min_var", w), ("singular", singular)):
            out[name].append(value)
    return out
