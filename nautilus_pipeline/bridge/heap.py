"""Keep freed heap memory for the next message instead of handing it back to the OS (glibc).

nats-py's parser gathers each message in a ``bytearray`` (32 KiB reads) and copies it out as
``bytes``; the publisher joins a message's parts into one ``bytes``. At 100-400 kB a message
these grow the heap's top beyond what glibc keeps, it gives the top back at the free
(``M_TRIM_THRESHOLD``), and the next message page-faults it in again: nats-py's ``Parser.parse``
took 161 µs for a 140 kB message and 538 µs for a 410 kB one (``scripts/profile_nats_parse.py``, the
parser fed 32 KiB chunks, 2-core dev VM loaded by other jobs), of which a copy of the bytes is
3-13 µs. With ``M_TOP_PAD`` = 16 MiB (glibc keeps that much above the heap's top when it grows
or trims it) the same parse takes 8 and 33 µs. The cost is up to 16 MiB of address space kept
mapped per process; a bigger ``M_MMAP_THRESHOLD`` or ``M_TRIM_THRESHOLD`` alone did not help
(the same script).

Process-wide and idempotent; elsewhere than glibc (macOS, musl) nothing is done.
"""

from __future__ import annotations

import ctypes
import sys

M_TOP_PAD = -2
SLACK = 16 << 20
"""Bytes glibc keeps above the heap's top (a few dozen messages of the largest size)."""

_done = False


def keep_slack(nbytes: int = SLACK) -> bool:
    """Ask glibc to keep ``nbytes`` above the heap's top (``mallopt(M_TOP_PAD)``); True if it did."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    _done = bool(mallopt(M_TOP_PAD, int(nbytes)))
    return _done
