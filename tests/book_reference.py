"""A plain float64 loop reference of the L2 book (kernels/book.py), shared by the book tests."""

from __future__ import annotations

import math

import numpy as np

from nautilus_pipeline.kernels.book import ACTION_CLEAR, BOOK_FEATURE_NAMES


def reference(side, price, size, action, levels=0):
    """Dict book of every level (no capacity), sorted on every row; the definition in
    kernels/book.py, term by term. A kernel with a smaller capacity must agree wherever it
    publishes a number (it writes NaN where a feature needs a level it forgot).

    With ``levels``, also the best ``levels`` levels after each row, shaped (n, 4, levels):
    bid price, bid size, ask price, ask size, NaN beyond the book's depth."""
    books = {1: {}, -1: {}}
    out = []
    lvs = []
    nan = math.nan

    def best(s):
        levels = sorted(books[s].items(), reverse=(s == 1))
        return levels

    for sd, p, q, a in zip(side, price, size, action, strict=True):
        bids, asks = best(1), best(-1)
        before = (bids[0] if bids else None, asks[0] if asks else None)
        if a == ACTION_CLEAR:
            books[1].clear()
            books[-1].clear()
        if math.isfinite(p) and sd in (1, -1):
            book = books[sd]
            if q > 0:
                book[p] = q
            else:
                book.pop(p, None)
        bids, asks = best(1), best(-1)
        row = []
        if bids and asks:
            (b, qb), (a_, qa) = bids[0], asks[0]
            row += [a_ - b, (a_ + b) / 2.0, (b * qa + a_ * qb) / (qb + qa)]
        else:
            row += [nan, nan, nan]
        for k in (1, 5, 10):
            sb = 0.0
            for _, s_ in bids[:k]:
                sb += s_
            sa = 0.0
            for _, s_ in asks[:k]:
                sa += s_
            row.append((sb - sa) / (sb + sa) if sb + sa > 0 else nan)
        if bids and asks and before[0] and before[1]:
            (b, qb), (a_, qa) = bids[0], asks[0]
            (b0, qb0), (a0, qa0) = before
            e = 0.0
            if b >= b0:
                e += qb
            if b <= b0:
                e -= qb0
            if a_ <= a0:
                e -= qa
            if a_ >= a0:
                e += qa0
            row.append(e)
        else:
            row.append(0.0)
        out.append(row)
        lv = np.full((4, levels), nan)
        for j, (p_, q_) in enumerate(bids[:levels]):
            lv[0, j], lv[1, j] = p_, q_
        for j, (p_, q_) in enumerate(asks[:levels]):
            lv[2, j], lv[3, j] = p_, q_
        lvs.append(lv)
    feats = np.array(out).reshape(-1, len(BOOK_FEATURE_NAMES))
    if levels:
        return feats, np.array(lvs).reshape(-1, 4, levels)
    return feats
