"""Where a request goes: the one function that picks (model, variant, experiment, assignment).

The rule lives in `ExperimentRegistry.choose` (server/experiments.py): an explicit `variant` wins (an
"override", still counted under the request's experiment), else the request's experiment assigns from its
sticky key: the experiment named by `experiment=`, or, when none is named, the model's default experiment
(the earliest-created running one on that model) so that a running experiment sees all of its model's
traffic ("assigned"), else the model's default variant ("default", no experiment). The assignment may also
name a shadow variant to run the images on off the latency path.
"""

from __future__ import annotations

from collections.abc import Mapping

from server.config import ServingConfig
from server.errors import ApiError
from server.experiments import Assignment, ExperimentError, ExperimentRegistry, ModelVariants

Route = Assignment  # the fields are the same: model, variant, experiment, assignment, shadow_variant


def build_registry(config: ServingConfig) -> ExperimentRegistry:
    """The experiment registry of a server, holding the config's experiments (logged as source "config")."""
    models = {name: ModelVariants(frozenset(m.variants), m.default_variant_name) for name, m in config.models.items()}
    return ExperimentRegistry(models, config.default_model_name, config.experiments)


def as_api_error(exc: ExperimentError) -> ApiError:
    """The HTTP error (docs/CONTRACT.md codes) of a refused experiment operation."""
    return ApiError(exc.status, exc.code, str(exc))


def choose_route(registry: ExperimentRegistry, *, model: str | None, variant: str | None,
                 experiment: str | None, headers: Mapping[str, str], query: Mapping[str, str],
                 client_host: str | None) -> Route:
    """Model and variant of one request; 404 for unknown names, 422 for an experiment of another model."""
    try:
        return registry.choose(model=model, experiment=experiment, variant=variant, headers=headers,
                               query=query, client_host=client_host)
    except ExperimentError as exc:
        raise as_api_error(exc) from None
