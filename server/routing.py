"""Where a request goes: the one function that picks (model, variant, experiment, assignment).

TODO(experiments): the A/B-testing code (server/experiments.py, `ExperimentRegistry.choose`) replaces the
body of `choose_route`: explicit variant > experiment assignment (sticky key) > the model's default variant,
plus the shadow variant. Until it is wired in, a request that names an existing experiment is refused with
422 rather than served outside it without saying so.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from server.config import ServingConfig
from server.errors import ApiError, invalid_parameter


@dataclass(frozen=True)
class Route:
    model: str
    variant: str
    experiment: str | None
    assignment: Literal["default", "assigned", "override"]
    shadow_variant: str | None = None  # also run on this reference variant (A/B shadow traffic)


def choose_route(config: ServingConfig, *, model: str | None, variant: str | None, experiment: str | None,
                 headers: Mapping[str, str], client_host: str | None) -> Route:
    """Model and variant of one request; 404 for unknown names."""
    if experiment is not None:
        if experiment not in config.experiments:
            raise ApiError(404, "unknown_experiment",
                           f"unknown experiment {experiment!r}; known: {sorted(config.experiments)}")
        raise invalid_parameter(f"experiment {experiment!r}: experiment routing is not enabled in this server")
    model = model if model is not None else config.default_model_name
    if model not in config.models:
        raise ApiError(404, "unknown_model", f"unknown model {model!r}; known: {sorted(config.models)}")
    variants = config.models[model].variants
    if variant is None:
        return Route(model, config.models[model].default_variant_name, None, "default")
    if variant not in variants:
        raise ApiError(404, "unknown_variant",
                       f"model {model!r} has no variant {variant!r}; known: {sorted(variants)}")
    return Route(model, variant, None, "override")
