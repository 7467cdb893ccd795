"""Symbol table: ``symbol_id`` (uint32, what slabs carry) ↔ instrument name (what people read).

Slabs carry integer ids so that kernels group rows by symbol with integer ops; names appear
only at the edges (readers, signals, logs). One table is shared by every source and stage
of a pipeline, so an id means the same instrument everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable

from .errors import ConfigError


class SymbolTable:
    """Assigns ids in order of first appearance; ``allowed`` makes unknown names an error."""

    def __init__(self, names: Iterable[str] = (), *, allowed: Iterable[str] | None = None):
        self._ids: dict[str, int] = {}
        self._names: list[str] = []
        self.allowed = frozenset(allowed) if allowed is not None else None
        for n in names:
            self.id_of(n)

    def id_of(self, name: str) -> int:
        """The id of ``name``, assigning the next one on first sight."""
        sid = self._ids.get(name)
        if sid is None:
            if self.allowed is not None and name not in self.allowed:
                raise ConfigError(
                    f"unknown symbol {name!r}: this pipeline trades {sorted(self.allowed)}; "
                    "add it to the pipeline's symbols or filter it out"
                )
            sid = len(self._names)
            self._ids[name] = sid
            self._names.append(name)
        return sid

    def name_of(self, symbol_id: int) -> str:
        try:
            return self._names[int(symbol_id)]
        except IndexError:
            raise KeyError(f"no symbol with id {symbol_id} (table has {len(self)})") from None

    def __contains__(self, name: object) -> bool:
        return name in self._ids

    def __len__(self) -> int:
        return len(self._names)

    @property
    def names(self) -> list[str]:
        return list(self._names)

    def as_dict(self) -> dict[int, str]:
        return dict(enumerate(self._names))
