"""Medians with their range, the way every figure of the run is reported."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

WIDE = 1.3  # max/min above this: the spread is called wide


def summary(values: Sequence[float], digits: int = 1) -> dict[str, Any]:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0, "wide": False, "values": []}
    lo, hi = min(vals), max(vals)
    return {
        "median": round(statistics.median(vals), digits),
        "min": round(lo, digits),
        "max": round(hi, digits),
        "n": len(vals),
        "wide": bool(lo > 0 and hi / lo > WIDE),
        "values": [round(v, digits) for v in vals],
    }


def percentiles(samples: Sequence[float]) -> dict[str, float]:
    """p50 / p95 / p99 / mean / max of latency samples (nearest-rank)."""
    s = sorted(samples)
    if not s:
        return {}

    def p(q: float) -> float:
        return round(s[min(len(s) - 1, max(0, int(round(q * len(s) + 0.5)) - 1))], 3)

    return {"p50": p(0.50), "p95": p(0.95), "p99": p(0.99),
            "mean": round(statistics.fmean(s), 3), "max": round(s[-1], 3), "n": len(s)}


def fmt_range(s: dict[str, Any], digits: int = 0) -> str:
    if not s or s.get("median") is None:
        return "–"
    f = f"{{:,.{digits}f}}"
    text = f.format(s["median"])
    if s.get("n", 0) > 1:
        text += f" ({f.format(s['min'])}–{f.format(s['max'])})"
    if s.get("wide"):
        text += " wide"
    return text
