"""Silent loss hunted in the Tardis, FX, Parquet/Nautilus, DBN, MBO and LOBSTER readers.

Each test is one way a file these readers take was read short, or with values it does not
hold, without a word: damaged copies of the bundled samples or files built here, and the
promise checked: every row read is delivered or refused (counted, with its line or record),
and no value is delivered that the file does not say.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pytest

from nautilus_pipeline.errors import DataError
from nautilus_pipeline.io import Replay, Source

DATA = Path(__file__).resolve().parents[1] / "nautilus_pipeline" / "data"


def replay(path: Path, fmt: str, policy: str = "reject", chunk_rows: int = 65_536, **kw) -> tuple[dict, Replay]:
    """All delivered columns, and the replay (its accounting, checked to close)."""
    r = Replay([Source(path, format=fmt, policy=policy, **kw)], chunk_rows=chunk_rows)
    blocks = list(r.iter_arrays())
    cols = {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]} if blocks else {}
    r.accounting.check()
    return cols, r


def utc_ns(*args: int) -> int:
    t = dt.datetime(*args, tzinfo=dt.UTC) - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    return (t.days * 86_400 + t.seconds) * 10**9 + t.microseconds * 1000


# --- FX: times that do not exist -------------------------------------------------------------
@pytest.mark.parametrize(("fmt", "good", "bad"), [
    ("histdata", "20200101 170000000,1.1212,1.1217,0", ["20200101 250000000,1.1212,1.1217,0",
                                                         "20200101 176100000,1.1212,1.1217,0",
                                                         "20200101 170061000,1.1212,1.1217,0",
                                                         "20200230 170000000,1.1212,1.1217,0",
                                                         "20210229 170000000,1.1212,1.1217,0",
                                                         "20200431 170000000,1.1212,1.1217,0"]),
    ("truefx", "USD/JPY,20200101 17:00:00.000,86.81,86.83", ["USD/JPY,20200101 24:00:00.000,86.81,86.83",
                                                             "USD/JPY,20200101 17:60:00.000,86.81,86.83",
                                                             "USD/JPY,20200101 17:00:60.000,86.81,86.83",
                                                             "USD/JPY,20200230 17:00:00.000,86.81,86.83",
                                                             "USD/JPY,20200631 17:00:00.000,86.81,86.83",
                                                             "USD/JPY,19000229 17:00:00.000,86.81,86.83"]),
])
def test_fx_times_that_do_not_exist_are_refused_not_carried_into_the_next_day(tmp_path: Path, fmt: str, good: str,
                                                                              bad: list[str]) -> None:
    """Hour 25, minute 61 or February 30 were added up as they stood: ``25:00`` on Jan 1 became
    01:00 on Jan 2 and ``0230`` became March 1, delivered as real quotes (found in this hunt)."""
    p = tmp_path / "EURUSD.csv"
    p.write_text("\n".join([good, *bad]) + "\n")
    cols, r = replay(p, fmt)
    t = r.accounting.total
    assert (t.read, t.delivered, t.rejected, dict(t.by_reason)) == (1 + len(bad), 1, len(bad), {"unparsable": len(bad)})
    offset = 5 if fmt == "histdata" else 0  # HistData: EST without DST
    assert cols["ts_ns"].tolist() == [utc_ns(2020, 1, 1, 17 + offset)]
    with pytest.raises(DataError, match=r"line/record 2, field '(datetime|timestamp)'.*unparsable"):
        replay(p, fmt, policy="fail")


def test_fx_leap_days_and_the_last_second_of_a_day_are_real_times(tmp_path: Path) -> None:
    p = tmp_path / "EURUSD.csv"
    p.write_text("20000229 000000000,1.1212,1.1217,0\n20001231 235959000,1.1212,1.1217,0\n"
                 "20200229 235959999,1.1212,1.1217,0\n")
    cols, _ = replay(p, "histdata", policy="fail")
    assert cols["ts_ns"].tolist() == [utc_ns(2000, 2, 29, 5), utc_ns(2001, 1, 1, 4, 59, 59),
                                      utc_ns(2020, 3, 1, 4, 59, 59, 999_000)]
