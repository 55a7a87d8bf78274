"""Weighted variant lists for the Locust file, kept apart so that tests need not import Locust
(importing it monkey-patches the standard library with gevent)."""
from __future__ import annotations

import math


def parse_weighted_variants(text: str) -> dict[str, float]:
    """'baseline:1,mame-0.9:2' -> {'baseline': 1.0, 'mame-0.9': 2.0}; a name without weight weighs 1;
    an empty text means the server's default variant."""
    weights: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, weight = item.partition(":")
        name = name.strip()
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"variant weight must be a number in {item!r}") from None
        if not name or not math.isfinite(value) or value <= 0:
            raise ValueError(f"expected NAME or NAME:POSITIVE_WEIGHT, got {item!r}")
        weights[name] = value
    return weights
