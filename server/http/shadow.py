"""Shadow runs: an answered request's images run again on the experiment's reference variant, at low
priority and off the latency path, and the two top-1s compared (the A/B report and the shadow metrics)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import torch

from server.engine.batching import QueueFull, SchedulerClosed, WorkItem
from server.experiments.stats import Top1, compare_top1

if TYPE_CHECKING:
    from server.engine.metrics import Metrics
    from server.engine.service import InferenceService
    from server.engine.worker import ImageResult
    from server.experiments.registry import Assignment, ExperimentRegistry

log = logging.getLogger("mame.server")


class Shadows:
    """Starts shadow runs and holds them until done (the event loop keeps only weak references to tasks)."""

    def __init__(self, service: InferenceService, registry: ExperimentRegistry, metrics: Metrics) -> None:
        self.service = service
        self.registry = registry
        self.metrics = metrics
        self._tasks: set[asyncio.Task] = set()

    def start(self, route: Assignment, images: list[torch.Tensor], results: list[ImageResult]) -> None:
        task = asyncio.create_task(self._run(route, images, results))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, route: Assignment, images: list[torch.Tensor], results: list[ImageResult]) -> None:
        reference = route.shadow_variant
        assert reference is not None
        labels = (route.model, route.experiment or "", route.variant, reference)  # the shadow metrics' order
        loop = asyncio.get_running_loop()
        config = self.service.config
        settings = config.models[route.model].variants[reference]
        deadline = time.monotonic() + config.limits.request_timeout_s
        items = [WorkItem(route.model, reference, settings, image, 1, deadline, loop.create_future(), loop)
                 for image in images]
        try:
            self.service.scheduler.submit(items, shadow=True)
        except (QueueFull, SchedulerClosed) as exc:
            log.debug("shadow run dropped: %s", exc)
            self.metrics.shadow_dropped_of(*labels).inc(len(items))
            return
        outcomes = await asyncio.gather(*(item.future for item in items), return_exceptions=True)
        for served, shadowed in zip(results, outcomes):
            if isinstance(shadowed, BaseException):  # expired in the queue or dropped at shutdown
                self.metrics.shadow_dropped_of(*labels).inc()
                continue
            # clamp: a float32 softmax may overshoot 1 by an ulp
            comparison = compare_top1(Top1(served.indices[0], min(served.scores[0], 1.0)),
                                      Top1(shadowed.indices[0], min(shadowed.scores[0], 1.0)))
            self.registry.record_shadow(route, comparison)
            self.metrics.shadow_comparisons_of(*labels).inc()
            self.metrics.shadow_agreements_of(*labels).inc(comparison.agree)
            self.metrics.shadow_top1_prob_abs_diff_of(*labels).inc(comparison.prob_abs_diff)
