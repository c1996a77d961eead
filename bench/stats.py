"""Percentiles, the way numpy's default (linear interpolation) computes them."""

from __future__ import annotations


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    data = sorted(values)
    rank = (len(data) - 1) * p / 100.0
    low = int(rank)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (rank - low)


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 2)


def summary_ms(samples: list[float], ps=(50, 95, 99)) -> dict:
    """{"p50_ms", "p95_ms", "p99_ms", "mean_ms", "max_ms", "samples"} of samples in seconds."""
    out = {f"p{p}_ms": ms(percentile(samples, p)) for p in ps}
    out["mean_ms"] = ms(sum(samples) / len(samples)) if samples else None
    out["max_ms"] = ms(max(samples)) if samples else None
    out["samples"] = len(samples)
    return out
