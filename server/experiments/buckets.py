"""Sticky assignment on bucket ranges.

A key is hashed with the experiment name to an integer point in [0, SCALE); the split is a list of disjoint
ranges that cover [0, SCALE), each owned by one variant. Changing the weights does not re-hash: `rebalance`
moves range from shrinking variants to growing ones only, so the share of keys that changes variant is the
least possible (the total variation distance between the old and new splits). Integer bounds keep that
arithmetic exact.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from server.experiments.config import parse_sticky, validate_split

SCALE = 2**64  # size of the hash space: bucket points are integers in [0, SCALE)


@dataclass(frozen=True)
class BucketRange:
    """Points start <= p < end of the hash space belong to `variant`."""

    start: int
    end: int
    variant: str

    @property
    def size(self) -> int:
        return self.end - self.start


def bucket_point(experiment: str, key: str) -> int:
    """Stable point in [0, SCALE) for a key: blake2b of experiment and key (the same on every host/run)."""
    digest = hashlib.blake2b(f"{experiment}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def random_point(rng: random.Random) -> int:
    """A uniformly random point, for requests without a key."""
    return rng.getrandbits(64)


def integer_shares(weights: Mapping[str, float]) -> dict[str, int]:
    """Weights (validated, summing to ~1) -> sizes in hash units that sum to exactly SCALE."""
    checked = validate_split(weights)
    total = math.fsum(checked.values())
    shares = {v: int(w / total * SCALE) for v, w in checked.items()}
    # Flooring loses a few units; give them to the largest variant (a relative error of ~1e-16).
    largest = max(shares, key=lambda v: shares[v])
    shares[largest] += SCALE - sum(shares.values())
    return shares


def _merged(ranges: Iterable[BucketRange]) -> tuple[BucketRange, ...]:
    """Sort by start and join touching ranges of the same variant."""
    out: list[BucketRange] = []
    for r in sorted(ranges, key=lambda r: r.start):
        if r.size <= 0:
            continue
        if out and out[-1].variant == r.variant and out[-1].end == r.start:
            out[-1] = BucketRange(out[-1].start, r.end, r.variant)
        else:
            out.append(r)
    return tuple(out)


def initial_ranges(weights: Mapping[str, float]) -> tuple[BucketRange, ...]:
    """A fresh split: one contiguous range per variant, in the split's order."""
    ranges, start = [], 0
    for variant, size in integer_shares(weights).items():
        ranges.append(BucketRange(start, start + size, variant))
        start += size
    return _merged(ranges)


def rebalance(old: Sequence[BucketRange], new_weights: Mapping[str, float]) -> tuple[BucketRange, ...]:
    """New ranges for new weights that move the fewest keys.

    Every variant keeps its old ranges, from the lowest point up, as far as its new share allows; what a
    shrinking (or removed) variant frees is handed, lowest point first, to the growing ones in the order
    of `new_weights`. So a growing variant keeps every old key, and keys only move from shrinking to
    growing variants. A variant may end up owning several intervals.
    """
    check_ranges(old)
    target = integer_shares(new_weights)
    allowance = dict(target)
    kept: list[BucketRange] = []
    freed: list[tuple[int, int]] = []
    for r in sorted(old, key=lambda r: r.start):
        keep = min(r.size, allowance.get(r.variant, 0))
        if keep:
            kept.append(BucketRange(r.start, r.start + keep, r.variant))
            allowance[r.variant] -= keep
        if keep < r.size:
            freed.append((r.start + keep, r.end))
    # allowance now holds what each growing variant still needs; exactly the freed total (integers).
    for variant, need in allowance.items():
        while need:
            start, end = freed.pop(0)
            take = min(need, end - start)
            kept.append(BucketRange(start, start + take, variant))
            need -= take
            if start + take < end:
                freed.insert(0, (start + take, end))
    assert not freed, "freed range left over: shares do not sum to SCALE"
    return _merged(kept)


def check_ranges(ranges: Sequence[BucketRange]) -> None:
    """Raise ValueError unless the ranges are disjoint, non-empty and cover [0, SCALE) exactly."""
    position = 0
    for r in sorted(ranges, key=lambda r: r.start):
        if r.start != position or r.end <= r.start:
            raise ValueError(f"bucket ranges do not tile [0, SCALE): gap or overlap at {r}")
        position = r.end
    if position != SCALE:
        raise ValueError("bucket ranges do not reach the end of the hash space")


def variant_at(ranges: Sequence[BucketRange], point: int) -> str:
    """The variant owning `point`; `ranges` sorted and tiling [0, SCALE) (a few ranges: a scan is fine)."""
    for r in ranges:
        if point < r.end:
            return r.variant
    raise ValueError(f"point {point} is outside the hash space")


def range_shares(ranges: Iterable[BucketRange]) -> dict[str, float]:
    """Fraction of the hash space each variant owns."""
    shares: dict[str, int] = {}
    for r in ranges:
        shares[r.variant] = shares.get(r.variant, 0) + r.size
    return {v: s / SCALE for v, s in shares.items()}


def key_for_request(
    sticky: str | None,
    headers: Mapping[str, str],
    query: Mapping[str, str],
    client_host: str | None,
) -> str | None:
    """The stickiness key of a request, or None (then the variant is drawn at random).

    Header names are matched case-insensitively; empty values count as absent.
    """
    if sticky is None:
        return None
    kind, name = parse_sticky(sticky)
    if kind == "client":
        value = client_host
    elif kind == "query":
        value = query.get(name)
    else:
        wanted = name.lower()
        value = next((v for k, v in headers.items() if k.lower() == wanted), None)
    if value is None or not value.strip():
        return None
    return value.strip()


def should_shadow(rate: float, rng: random.Random) -> bool:
    """Bernoulli(rate): run this request on the reference variant too?"""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"shadow rate must be in [0, 1], got {rate}")
    return rng.random() < rate
