"""The nearest-rank percentile glmkit bench and the benchmark scripts report (p50, p99): a value that was measured."""

from __future__ import annotations

import math


def percentile(values: list[float], q: float) -> float:
    """The smallest value with at least ``q`` of the values at or below it (``values`` not empty)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]
