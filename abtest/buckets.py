"""Bucket ranges of a split, computed once by whoever changes the split and shared through the split store.

A replica must not derive its ranges from its own history of splits: `rebalance(old, new)` depends on the
old ranges, so a pod that started after a few changes (from `initial_ranges` of the current split) would
own different ranges than one that saw every change, and the same key would go to different variants on
different pods. The writer of a change (the judge, an operator's command, the admin API) therefore computes
the new ranges and stores them beside the weights; every replica uses them as they are.

The arithmetic is the server's (server/experiments.py: `integer_shares`, `initial_ranges`, `rebalance`;
tests/test_abtest_buckets.py checks that both give the same ranges), kept here torch- and server-free so the
judge can compute it. Ranges are (start, end, variant) with integer bounds tiling [0, SCALE).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

SCALE = 2**64
Range = tuple[int, int, str]


def integer_shares(weights: Mapping[str, float]) -> dict[str, int]:
    """Weights summing to ~1 -> sizes in hash units summing to exactly SCALE (the remainder of flooring to
    the largest variant)."""
    total = math.fsum(weights.values())
    shares = {v: int(w / total * SCALE) for v, w in weights.items()}
    largest = max(shares, key=lambda v: shares[v])
    shares[largest] += SCALE - sum(shares.values())
    return shares


def merged(ranges: Iterable[Range]) -> tuple[Range, ...]:
    """Sorted by start, empty ones dropped, touching ranges of one variant joined."""
    out: list[Range] = []
    for start, end, variant in sorted(ranges):
        if end <= start:
            continue
        if out and out[-1][2] == variant and out[-1][1] == start:
            out[-1] = (out[-1][0], end, variant)
        else:
            out.append((start, end, variant))
    return tuple(out)


def initial_ranges(weights: Mapping[str, float]) -> tuple[Range, ...]:
    """One contiguous range per variant, in the split's order."""
    ranges, start = [], 0
    for variant, size in integer_shares(weights).items():
        ranges.append((start, start + size, variant))
        start += size
    return merged(ranges)


def rebalance(old: Sequence[Range], weights: Mapping[str, float]) -> tuple[Range, ...]:
    """New ranges for new weights moving the fewest keys: each variant keeps its old ranges from the lowest
    point up as far as its new share allows; what shrinking variants free goes, lowest point first, to the
    growing ones in the order of `weights`."""
    check_ranges(old)
    allowance = integer_shares(weights)
    kept: list[Range] = []
    freed: list[tuple[int, int]] = []
    for start, end, variant in sorted(old):
        keep = min(end - start, allowance.get(variant, 0))
        if keep:
            kept.append((start, start + keep, variant))
            allowance[variant] -= keep
        if keep < end - start:
            freed.append((start + keep, end))
    for variant, need in allowance.items():
        while need:
            start, end = freed.pop(0)
            take = min(need, end - start)
            kept.append((start, start + take, variant))
            need -= take
            if start + take < end:
                freed.insert(0, (start + take, end))
    return merged(kept)


def check_ranges(ranges: Sequence[Range]) -> None:
    """ValueError unless the ranges are non-empty, disjoint and tile [0, SCALE) exactly."""
    position = 0
    for start, end, variant in sorted(ranges):
        if start != position or end <= start or not isinstance(variant, str):
            raise ValueError(
                f"bucket ranges do not tile [0, 2^64): gap or overlap at {(start, end, variant)}"
            )
        position = end
    if position != SCALE:
        raise ValueError("bucket ranges do not reach the end of the hash space")


def shares_of(ranges: Iterable[Range]) -> dict[str, float]:
    """Fraction of the hash space each variant owns."""
    sizes: dict[str, int] = {}
    for start, end, variant in ranges:
        sizes[variant] = sizes.get(variant, 0) + end - start
    return {v: s / SCALE for v, s in sizes.items()}
