"""Stage state snapshots: versioned bytes that carry a stage (or a pipeline) across processes.

Why. A symbol's months of files are replayed as a chain of jobs (``nautilus_pipeline.batch``),
each a new process; the features' EWMAs, the open VPIN bucket and bar, the account and the
Monte Carlo generator must carry over from one file to the next, or the chain would not
give the numbers of one run over the concatenation.

Format. ``MAGIC``, a little-endian uint32 header length, an orjson header, then the raw
numpy buffers, each 64-byte aligned. The header holds the format version, what the
snapshot is of (``kind``: the stage's class, or ``pipeline``), a fingerprint of the
parameters that shape the numbers, and the state tree. The tree is plain JSON except for
tagged nodes: numpy arrays and scalars (a buffer index), dataclasses of this package
(rebuilt field by field, never by calling arbitrary code), tuples, maps with non-string keys
and non-finite floats. Nothing is pickled: a snapshot from elsewhere can only give wrong
numbers to a stage whose checks it passed, never run code. Pickle was the alternative
(one line); it would execute whatever a file says, and it ties the bytes to class layouts.

Validation on restore: the magic and version, the kind, and the parameter fingerprint are
checked, each failure a :class:`SnapshotError` saying what differs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import math
import struct
from typing import Any

import numpy as np
import orjson

from .errors import PipelineError

MAGIC = b"NPSNAP\x00\x01"
SNAPSHOT_VERSION = 1
"""Bumped whenever the layout of a stage's state changes; older snapshots are refused."""
_ALIGN = 64
_PACKAGE = __name__.rsplit(".", 1)[0]


class SnapshotError(PipelineError):
    """A snapshot cannot be made or restored: damaged, another version, another stage type,
    other parameters, or another pipeline definition (the message says which)."""


def fingerprint(params: Any) -> str:
    """A short digest of parameters (dataclasses, mappings, sequences, scalars, arrays)."""
    return hashlib.sha256(orjson.dumps(_plain(params), option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


def _plain(x: Any) -> Any:
    """Parameters as JSON-ready data, for fingerprints and for readable differences."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: _plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    if isinstance(x, np.ndarray):
        return {"dtype": x.dtype.str, "shape": list(x.shape),
                "sha256": hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()}
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return repr(x)
    if x is None or isinstance(x, bool | int | float | str):
        return x
    return str(x)


# --- the state tree ------------------------------------------------------------------------
class _Encoder:
    def __init__(self) -> None:
        self.buffers: list[np.ndarray] = []

    def array(self, a: np.ndarray) -> dict[str, Any]:
        if a.dtype.hasobject:
            raise SnapshotError(f"cannot snapshot an object array (dtype {a.dtype})")
        self.buffers.append(np.ascontiguousarray(a))
        return {"__nd__": len(self.buffers) - 1}

    def tree(self, x: Any) -> Any:
        if x is None or isinstance(x, bool | str):
            return x
        if isinstance(x, int):
            return x if -(1 << 63) <= x < (1 << 64) else {"__int__": str(x)}
        if isinstance(x, float):
            return x if math.isfinite(x) else {"__f__": repr(x)}
        if isinstance(x, np.ndarray):
            return self.array(x)
        if isinstance(x, np.generic):
            return {"__np__": self.array(np.asarray(x))["__nd__"]}
        if isinstance(x, tuple):
            return {"__tuple__": [self.tree(v) for v in x]}
        if isinstance(x, list):
            return [self.tree(v) for v in x]
        if isinstance(x, set | frozenset):
            return {"__set__": [self.tree(v) for v in sorted(x)]}
        if isinstance(x, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in x):
                return {k: self.tree(v) for k, v in x.items()}
            return {"__map__": [[self.tree(k), self.tree(v)] for k, v in x.items()]}
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            cls = type(x)
            if not cls.__module__.startswith(_PACKAGE + "."):
                raise SnapshotError(f"cannot snapshot {cls.__module__}.{cls.__qualname__}: "
                                    f"only {_PACKAGE}'s own state classes are carried")
            return {"__dc__": f"{cls.__module__}:{cls.__qualname__}",
                    "fields": {f.name: self.tree(getattr(x, f.name)) for f in dataclasses.fields(x)}}
        raise SnapshotError(f"cannot snapshot a {type(x).__module__}.{type(x).__qualname__}")


class _Decoder:
    def __init__(self, buffers: list[np.ndarray]):
        self.buffers = buffers

    def tree(self, x: Any) -> Any:
        if isinstance(x, list):
            return [self.tree(v) for v in x]
        if not isinstance(x, dict):
            return x
        if "__nd__" in x:
            return self.buffers[x["__nd__"]]
        if "__np__" in x:
            return self.buffers[x["__np__"]][()]
        if "__f__" in x:
            return float(x["__f__"])
        if "__int__" in x:
            return int(x["__int__"])
        if "__tuple__" in x:
            return tuple(self.tree(v) for v in x["__tuple__"])
        if "__set__" in x:
            return {self.tree(v) for v in x["__set__"]}
        if "__map__" in x:
            return {_hashable(self.tree(k)): self.tree(v) for k, v in x["__map__"]}
        if "__dc__" in x:
            return self.dataclass(x["__dc__"], x["fields"])
        return {k: self.tree(v) for k, v in x.items()}

    def dataclass(self, name: str, fields: dict[str, Any]) -> Any:
        module, _, qualname = name.partition(":")
        if not module.startswith(_PACKAGE + "."):
            raise SnapshotError(f"snapshot names the class {name!r}, which is not {_PACKAGE}'s")
        try:
            cls: Any = importlib.import_module(module)
            for part in qualname.split("."):
                cls = getattr(cls, part)
        except (ImportError, AttributeError):
            raise SnapshotError(f"snapshot names the class {name!r}, which this version lacks") from None
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            raise SnapshotError(f"snapshot names {name!r}, which is not a state class")
        names = {f.name for f in dataclasses.fields(cls)}
        if set(fields) != names:
            raise SnapshotError(f"snapshot's {qualname} has fields {sorted(fields)}, this version's "
                                f"{sorted(names)}: it comes from another version of the code")
        obj = object.__new__(cls)  # field by field: no __init__ or __post_init__ runs
        for key, value in fields.items():
            object.__setattr__(obj, key, self.tree(value))
        return obj


def _hashable(k: Any) -> Any:
    return tuple(k) if isinstance(k, list) else k


def encode(kind: str, params: str, state: Any, **meta: Any) -> bytes:
    """The bytes of a snapshot of ``kind`` with parameter fingerprint ``params``."""
    enc = _Encoder()
    tree = enc.tree(state)
    offsets, pos = [], 0
    for buf in enc.buffers:
        pos = -(-pos // _ALIGN) * _ALIGN
        offsets.append({"dtype": buf.dtype.str, "shape": list(buf.shape), "offset": pos})
        pos += buf.nbytes
    header = orjson.dumps({"version": SNAPSHOT_VERSION, "kind": kind, "params": params,
                           "meta": meta, "buffers": offsets, "state": tree})
    start = -(-(len(MAGIC) + 4 + len(header)) // _ALIGN) * _ALIGN
    out = bytearray(start + pos)
    out[: len(MAGIC)] = MAGIC
    out[len(MAGIC) : len(MAGIC) + 4] = struct.pack("<I", len(header))
    out[len(MAGIC) + 4 : len(MAGIC) + 4 + len(header)] = header
    for buf, where in zip(enc.buffers, offsets, strict=True):
        o = start + where["offset"]
        out[o : o + buf.nbytes] = buf.tobytes()
    return bytes(out)


@dataclasses.dataclass(frozen=True)
class Decoded:
    """A decoded snapshot: what it is of, its parameter fingerprint, extra fields, its state."""

    kind: str
    params: str
    meta: dict[str, Any]
    state: Any


def decode(data: bytes, *, kind: str | None = None, params: str | None = None,
           what: str = "snapshot") -> Decoded:
    """Read snapshot bytes, refusing another version, another ``kind`` or other ``params``."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise SnapshotError(f"{what}: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < len(MAGIC) + 4 or not data.startswith(MAGIC[:6]):
        raise SnapshotError(f"{what}: not a nautilus_pipeline snapshot (bad magic bytes)")
    (n,) = struct.unpack("<I", data[len(MAGIC) : len(MAGIC) + 4])
    try:
        header = orjson.loads(data[len(MAGIC) + 4 : len(MAGIC) + 4 + n])
    except orjson.JSONDecodeError as exc:
        raise SnapshotError(f"{what}: damaged header ({exc})") from None
    version = header.get("version") if isinstance(header, dict) else None
    if data[: len(MAGIC)] != MAGIC or version != SNAPSHOT_VERSION:
        raise SnapshotError(f"{what}: snapshot format version {version}, this code reads version "
                            f"{SNAPSHOT_VERSION}; replay again with the version that made it")
    if kind is not None and header["kind"] != kind:
        raise SnapshotError(f"{what}: a snapshot of {header['kind']}, not of {kind}")
    if params is not None and header["params"] != params:
        raise SnapshotError(f"{what}: made with other parameters (fingerprint {header['params']}, "
                            f"this one {params}); restore it into a stage built from the same definition")
    start = -(-(len(MAGIC) + 4 + n) // _ALIGN) * _ALIGN
    buffers = []
    try:
        for b in header["buffers"]:
            dtype = np.dtype(b["dtype"])
            count = int(np.prod(b["shape"], dtype=np.int64))
            o = start + b["offset"]
            if o + count * dtype.itemsize > len(data):
                raise SnapshotError(f"{what}: cut short ({len(data)} bytes, a buffer ends past them)")
            arr = np.frombuffer(data, dtype=dtype, count=count, offset=o).reshape(b["shape"])
            buffers.append(arr.copy())
        state = _Decoder(buffers).tree(header["state"])
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise SnapshotError(f"{what}: damaged ({type(exc).__name__}: {exc})") from None
    return Decoded(header["kind"], header["params"], header.get("meta", {}), state)


__all__ = ["SNAPSHOT_VERSION", "Decoded", "SnapshotError", "decode", "encode", "fingerprint"]
