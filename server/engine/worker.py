"""Device workers: one thread per device runs batches of every model on that device."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from mame_core import MergeSettings
from server.engine.batching import Scheduler, WorkItem, resolve_all
from server.engine.devices import DeviceModel
from server.engine.metrics import Metrics
from server.wire.errors import ApiError, internal, timeout
from server.wire.results import ImageResult

log = logging.getLogger("mame.server")
T = TypeVar("T")
# top-k scores [B, k], top-k indices [B, k], tokens per block [B, blocks], GFLOPs [B] (all on the CPU), and
# the number of input tokens
BatchOutputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]
# The same as lists, a row per image: what answers are made of, and what crosses a device process's pipe
# (plain lists pickle and unpickle in a fraction of numpy arrays' time, on the engine's busy interpreter)
BatchRows = tuple[list[list[float]], list[list[int]], list[list[int]], list[float], int]


def as_rows(outputs: BatchOutputs) -> BatchRows:
    scores, indices, tokens, gflops, input_tokens = outputs
    return scores.tolist(), indices.tolist(), tokens.tolist(), gflops.tolist(), int(input_tokens)


def stack_batch(images: Sequence[torch.Tensor], pin: bool) -> torch.Tensor:
    """[3, H, W] images -> one [B, 3, H, W] tensor; for a GPU written straight into pinned (page-locked)
    memory, so the copy to the device needs no second host copy. Raises if the shapes differ."""
    memory = torch.empty(len(images) * images[0].numel(), dtype=images[0].dtype, pin_memory=pin)
    return stack_into(images, memory)[0]


def stack_into(images: Sequence[torch.Tensor], memory: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Copy [3, H, W] images into flat `memory`: the [B, 3, H, W] batch there, and whether it is
    channels-last underneath.

    Crops from the decoders are channels-last underneath ([H, W, 3] memory seen as [3, H, W]): they are
    stacked as such (a plain copy: transposing on the host costs several times more) and `infer` makes
    the batch channels-first on the device."""
    channels_last = all(channels_last_view(image) for image in images)
    batch = batch_view(memory, len(images), tuple(images[0].shape), channels_last)
    # channels-last: stacked as [B, H, W, 3] (contiguous out: torch's fastest copy)
    sources = [image.permute(1, 2, 0) for image in images] if channels_last else list(images)
    torch.stack(sources, out=batch.permute(0, 2, 3, 1) if channels_last else batch)
    return batch, channels_last


def batch_view(memory: torch.Tensor, size: int, shape: tuple[int, ...], channels_last: bool) -> torch.Tensor:
    """The first `size` images of flat `memory` as [B, 3, H, W] (laid out [B, H, W, 3] if channels_last)."""
    channels, height, width = shape
    flat = memory[: size * channels * height * width]
    if channels_last:
        return flat.view(size, height, width, channels).permute(0, 3, 1, 2)
    return flat.view(size, channels, height, width)


def channels_last_view(image: torch.Tensor) -> bool:
    """A [3, H, W] tensor whose memory is [H, W, 3] (strides read, not a permuted view's: per image)."""
    return image.dim() == 3 and image.shape[0] == 3 and image.stride() == (1, 3 * image.shape[2], 3)


def model_input(dm: DeviceModel, x: torch.Tensor) -> torch.Tensor:
    """Images [B, 3, H, W] on the host -> the model's input on its device. uint8 crops are normalised here,
    after the copy (exactly timm's ToTensor + Normalize); float32 images are a client's own normalised
    pixels (the Open Inference Protocol's `pixel_values`) and go in as they are."""
    if x.dtype not in (torch.uint8, torch.float32):
        raise TypeError(f"images must be uint8 crops or float32 normalised images, got {x.dtype}")
    x = x.to(dm.device, non_blocking=True)  # asynchronous from pinned memory; a no-op on the CPU
    if x.dtype == torch.float32:
        return x.contiguous().to(dm.dtype)
    # Channels-last batches become channels-first here: on a GPU one small kernel; the model and its
    # numerics then see exactly what they saw before.
    return x.contiguous().float().div_(255).sub_(dm.mean).div_(dm.std).to(dm.dtype)


def by_input_kind(items: Sequence[WorkItem]) -> list[list[WorkItem]]:
    """A batch's items as runs of one input dtype (uint8 crops, float32 images): a batch is one tensor."""
    kinds: dict[torch.dtype, list[WorkItem]] = {}
    for item in items:
        kinds.setdefault(item.image.dtype, []).append(item)
    return list(kinds.values())


def infer(dm: DeviceModel, settings: MergeSettings, x: torch.Tensor, top_k: int) -> BatchOutputs:
    """Images [B, 3, H, W] on the host (model_input) -> top-k scores and indices, tokens per block, GFLOPs
    (all on the CPU) and input tokens."""
    with torch.inference_mode():
        res = dm.vit(model_input(dm, x), settings)
        probs = res.logits.float().softmax(dim=-1)
        scores, indices = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    return scores.cpu(), indices.cpu(), res.tokens.cpu(), res.gflops.cpu(), res.input_tokens


@dataclass(frozen=True)
class Explanation:
    """One image's forward with its source maps kept (`POST /v1/explain`): the source map after each block
    shown ([tokens, patches] float32, a row per token: how much of each patch it holds), the real tokens
    after every block, and the tokens entering the first. numpy, so that it crosses a pipe by value."""

    sources: list[np.ndarray]
    tokens_per_block: list[int]
    input_tokens: int


def explain_forward(dm: DeviceModel, settings: MergeSettings, crop: torch.Tensor):
    """One image's forward with its source maps: uint8 [3, H, W] crop -> MergeResult."""
    with torch.inference_mode():
        return dm.vit(model_input(dm, crop.unsqueeze(0)), settings, return_source=True)


def explain_image(dm: DeviceModel, settings: MergeSettings, crop: torch.Tensor,
                  blocks: list[int]) -> Explanation:
    """The forward of explain_forward, as the Explanation of `blocks` (1-based)."""
    result = explain_forward(dm, settings, crop)
    sources = [result.sources[block - 1][0].float().cpu().numpy() for block in blocks]
    return Explanation(sources, result.tokens[0].tolist(), int(result.input_tokens))


def split_on_oom(
    run: Callable[[int, int], T], start: int, stop: int, device: object = ""
) -> list[tuple[int, int, T]]:
    """`run(start, stop)` over images [start, stop) as one batch; on out-of-memory, the two halves separately
    (recursively, down to one image). Returns (start, stop, result) of each batch that ran."""
    try:
        return [(start, stop, run(start, stop))]
    except torch.OutOfMemoryError:
        if stop - start == 1:
            raise
        log.warning("worker %s: out of memory on a batch of %d, splitting it", device, stop - start)
    # Outside the except block, so the failed attempt's tensors are released before the retry.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    middle = (start + stop) // 2
    return split_on_oom(run, start, middle, device) + split_on_oom(run, middle, stop, device)


def drop_expired(batch: list[WorkItem]) -> list[WorkItem]:
    """The items still worth running: those past their deadline are failed (their request answers 504)."""
    now = time.monotonic()
    live = []
    for item in batch:
        if now >= item.deadline:  # its request is answering 504 already; don't spend the device on it
            item.fail(timeout("the request deadline passed while it waited in the queue"))
        else:
            live.append(item)
    return live


def resolve_batch(items: Sequence[WorkItem], outputs: BatchRows, inference_s: float, device: str,
                  metrics: Metrics) -> None:
    """Answer each item of a batch that ran, and record the batch's metrics."""
    scores, indices, tokens, gflops, input_tokens = outputs
    first = items[0]
    labels = (first.model, first.variant, device)
    metrics.batch_inference_of(*labels).observe(inference_s)
    metrics.batch_size_of(*labels).observe(len(items))
    rows = zip(items, indices, scores, tokens, gflops)
    size = len(items)
    resolve_all(list(items), [ImageResult(
        indices=top[: item.top_k],
        scores=probabilities[: item.top_k],
        tokens_per_block=per_block,
        input_tokens=input_tokens,
        gflops=image_gflops,
        queue_s=item.taken_at - item.enqueued_at,
        inference_s=inference_s,
        batch_size=size,
        device=device,
    ) for item, top, probabilities, per_block, image_gflops in rows])


def fail_batch(items: Sequence[WorkItem], exc: BaseException | str, device: object) -> None:
    """Fail a batch's items with 500 (the error logged once, with its traceback when there is one); an
    ApiError (a stalled device) is the answer itself."""
    if isinstance(exc, ApiError):
        for item in items:
            item.fail(exc)
        return
    log.error("worker %s: a batch of %d failed: %s", device, len(items), exc,
              exc_info=exc if isinstance(exc, BaseException) else None)
    detail = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    for item in items:
        item.fail(internal(f"inference failed: {detail}"))


def warm_up_sizes(device: torch.device, max_batch: int) -> list[int]:
    """Batch sizes run once before serving: a full batch on GPU allocates the memory pools up front."""
    return [1, 2] if device.type == "cpu" else sorted({1, max_batch})


class DeviceWorker:
    """Takes batches from the scheduler and runs them on its device in a dedicated thread."""

    def __init__(self, device: torch.device, models: dict[str, DeviceModel], scheduler: Scheduler,
                 metrics: Metrics, torch_threads: int | None = None):
        self.device = device
        self.torch_threads = torch_threads
        self.models = models
        self.scheduler = scheduler
        self.metrics = metrics
        self._running: list[WorkItem] = []  # the batch in the forward now
        self._running_since = 0.0
        self._thread = threading.Thread(target=self._loop, name=f"worker-{device}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout_s: float | None = None) -> None:
        self._thread.join(timeout_s)

    def warm_up(self, variants: dict[str, dict[str, MergeSettings]], max_batch: dict[str, int]) -> None:
        """One forward per variant (and a full batch on GPU) so the first requests pay no start-up costs."""
        for name, dm in self.models.items():
            for settings in variants[name].values():
                for size in warm_up_sizes(dm.device, max_batch[name]):
                    images = torch.randint(0, 256, (size, *dm.input_size), dtype=torch.uint8).unbind()
                    self.forward(dm, settings, stack_batch(images, pin=dm.device.type == "cuda"), top_k=1)

    def forward(self, dm: DeviceModel, settings: MergeSettings, x: torch.Tensor, top_k: int) -> BatchOutputs:
        return infer(dm, settings, x, top_k)

    def _loop(self) -> None:
        if self.torch_threads:  # torch's thread count is per thread: set it where inference runs
            torch.set_num_threads(self.torch_threads)
        while (batch := self.scheduler.next_batch(self.models.keys())) is not None:
            if live := drop_expired(batch):
                self._running_since, self._running = time.monotonic(), live
                self._run(live)
                self._running = []
        log.info("worker %s: queue drained, stopping", self.device)

    def busy_for(self, now: float) -> float:
        """Seconds this worker has had a batch without finishing one (0: idle). Read by the watchdog."""
        return now - self._running_since if self._running else 0.0

    def stall(self, error: ApiError) -> None:
        """The watchdog found this worker stalled: the batch in its forward answers `error` now (a thread
        cannot be stopped; should the forward ever end, its answers find the requests answered)."""
        fail_batch(self._running, error, self.device)

    def explain(self, model: str, settings: MergeSettings, crop: torch.Tensor, blocks: list[int],
                executor: Executor) -> Future[Explanation]:
        """One image's explanation, run in `executor` beside this worker's batches (the weights are shared:
        a forward only reads them)."""
        return executor.submit(explain_image, self.models[model], settings, crop, blocks)

    def _run(self, items: list[WorkItem]) -> None:
        for run in by_input_kind(items):
            self._run_one_kind(run)

    def _run_one_kind(self, items: list[WorkItem]) -> None:
        """Run items as one batch (halves on CUDA out-of-memory); a failure fails only these items."""
        first = items[0]
        dm = self.models[first.model]
        top_k = max(item.top_k for item in items)

        def run(start: int, stop: int) -> tuple[BatchOutputs, float]:
            started = time.monotonic()
            x = stack_batch([item.image for item in items[start:stop]], pin=dm.device.type == "cuda")
            outputs = self.forward(dm, first.settings, x, top_k=top_k)
            return outputs, time.monotonic() - started

        try:
            for start, stop, (outputs, inference_s) in split_on_oom(run, 0, len(items), self.device):
                rows = as_rows(outputs)
                resolve_batch(items[start:stop], rows, inference_s, str(self.device), self.metrics)
        except Exception as exc:  # noqa: BLE001 - a failing batch fails only its own requests
            fail_batch(items, exc, self.device)
