"""Bucket ranges of a split as plain (start, end, variant) tuples, for the split store.

A replica must not derive its ranges from its own history of splits: `rebalance(old, new)` depends on the
old ranges, so a pod that started after a few changes (from `initial_ranges` of the current split) would
own different ranges than one that saw every change, and the same key would go to different variants on
different pods. The writer of a change (the judge, an operator's command, the admin API) therefore computes
the new ranges and stores them beside the weights; every replica uses them as they are.

The arithmetic is the server's own (`server.experiments.buckets`); this module only converts its
`BucketRange` objects to and from the tuples the store writes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from server.experiments import buckets as server_buckets

SCALE = server_buckets.SCALE
Range = tuple[int, int, str]


def _to_tuples(ranges: Iterable[server_buckets.BucketRange]) -> tuple[Range, ...]:
    return tuple((r.start, r.end, r.variant) for r in ranges)


def _from_tuples(ranges: Iterable[Range]) -> tuple[server_buckets.BucketRange, ...]:
    return tuple(server_buckets.BucketRange(int(s), int(e), v) for s, e, v in ranges)


def initial_ranges(weights: Mapping[str, float]) -> tuple[Range, ...]:
    """One contiguous range per variant, in the split's order."""
    return _to_tuples(server_buckets.initial_ranges(weights))


def rebalance(old: Sequence[Range], weights: Mapping[str, float]) -> tuple[Range, ...]:
    """New ranges for new weights moving the fewest keys (the server's `rebalance`)."""
    return _to_tuples(server_buckets.rebalance(_from_tuples(old), weights))


def check_ranges(ranges: Sequence[Range]) -> None:
    """ValueError unless the ranges are non-empty, disjoint and tile [0, SCALE) exactly."""
    if any(not isinstance(variant, str) for _, _, variant in ranges):
        raise ValueError("bucket ranges need a variant name in each")
    server_buckets.check_ranges(_from_tuples(ranges))


def shares_of(ranges: Iterable[Range]) -> dict[str, float]:
    """Fraction of the hash space each variant owns."""
    return server_buckets.range_shares(_from_tuples(ranges))
