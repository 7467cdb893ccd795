"""Every topic the pipeline publishes, built in one place.

Grammar (``bus.py``): dot-separated segments; subscribers may use ``*`` (one segment) and
``>`` or ``**`` (the rest); ``publish`` refuses wildcards. What a run publishes:

==============================  ===================  ===========================================
topic                           payload              by
==============================  ===================  ===========================================
``signals.<symbol>``            ``Signal``           the signal stage, when (side, target) changes
``vpin.<symbol>``               ``VpinBucket``       the VPIN stage, per closed bucket
``risk.<symbol>``               ``RiskEvent``        the risk stage: breaches and VaR reports
``portfolio.<pipeline>``        ``PortfolioEvent``   the portfolio stage, per bar
``deadletter.<topic>``          ``DeadLetter``       the bus, for a batch a stage failed on
``pipeline.<name>.ticks``       ``Lease``            the ingress (replay, ``ingest``, ticks)
``pipeline.<name>.<stage>``     ``Lease``            stage → next stage (internal)
``control.<name>.stats``        request/reply        ``bus.request`` answers with ``stats()``
``ticks.<kind>.<venue>.<sym>``  tick batches         the subject scheme of tick streams between
                                                     processes (the NATS bridge), e.g.
                                                     ``ticks.trades.BINANCE.ETHUSDT``
==============================  ===================  ===========================================

A symbol is one segment: it is used as given (``BTCUSDT-PERP``, ``ESU4``); a name holding a
``.``, a wildcard or a space would change the topic's shape and is refused here.
"""

from __future__ import annotations

from .errors import ConfigError

SIGNALS, VPIN, RISK, PORTFOLIO = "signals", "vpin", "risk", "portfolio"
DEADLETTER_PREFIX = "deadletter."


def segment(name: str, what: str = "symbol") -> str:
    """``name`` as one topic segment, or a ConfigError saying why it cannot be one."""
    if not name or any(c in name for c in ". \t\n*>") or name == "**":
        raise ConfigError(f"{what} {name!r} cannot be a topic segment (no '.', spaces or "
                          "wildcards); rename it in the source (symbol = ...)")
    return name


def event(prefix: str, symbol: str) -> str:
    """``<prefix>.<symbol>``: a stage's per-symbol event topic (signals, vpin, risk)."""
    return f"{prefix}.{symbol}"


def signals(symbol: str) -> str:
    return event(SIGNALS, symbol)


def vpin(symbol: str) -> str:
    return event(VPIN, symbol)


def risk(symbol: str) -> str:
    return event(RISK, symbol)


def portfolio(pipeline: str) -> str:
    return event(PORTFOLIO, pipeline)


def deadletter(topic: str) -> str:
    return DEADLETTER_PREFIX + topic


def ingress(pipeline: str) -> str:
    return f"pipeline.{pipeline}.ticks"


def stage_output(pipeline: str, stage: str) -> str:
    return f"pipeline.{pipeline}.{stage}"


def stats(pipeline: str) -> str:
    return f"control.{pipeline}.stats"


TICK_KINDS = ("trades", "quotes", "book", "mixed")


def ticks(kind: str, venue: str, symbol: str) -> str:
    """``ticks.<kind>.<venue>.<symbol>``: kind ``trades``, ``quotes``, ``book`` (level
    changes), or ``mixed`` (rows of several kinds in their original order)."""
    if kind not in TICK_KINDS:
        raise ConfigError(f"tick kind must be one of {', '.join(map(repr, TICK_KINDS))}, got {kind!r}")
    return f"ticks.{kind}.{segment(venue, 'venue')}.{segment(symbol)}"
