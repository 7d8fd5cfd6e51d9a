"""Binomial rates with Wilson score intervals."""

from __future__ import annotations

import math


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% by default); (0, 1) when n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def rate(successes: int, n: int) -> dict[str, float]:
    """``{"rate", "low", "high", "n"}``: the schema of every ASR figure the library reports."""
    low, high = wilson_interval(successes, n)
    return {"rate": successes / n if n else 0.0, "low": low, "high": high, "n": n}
