"""The inference service: loads the models, runs the device workers and takes images for inference."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from mame_core import MergeSettings
from server.batching import Scheduler, WorkItem
from server.config import ServingConfig
from server.imaging import decode_image
from server.metrics import Metrics
from server.models import HostTransform, LoadedModel, load_model
from server.worker import DeviceModel, DeviceWorker, place_model, resolve_devices, resolve_dtype

log = logging.getLogger("mame.server")


@dataclass(frozen=True)
class ModelInfo:
    """What /v1/models says about a loaded model."""

    name: str
    arch: str
    weights: str
    devices: list[str]
    dtype: str
    input_size: tuple[int, int, int]
    labels: list[str]

    @property
    def device_label(self) -> str:
        return ",".join(self.devices)

    def describe(self, config: ServingConfig) -> dict:
        cfg = config.models[self.name]
        return {
            "name": self.name,
            "arch": self.arch,
            "weights": self.weights,
            "device": self.device_label,
            "dtype": self.dtype,
            "input_size": list(self.input_size),
            "default_variant": cfg.default_variant_name,
            "variants": {name: _settings_dict(s) for name, s in cfg.variants.items()},
            "batching": cfg.batching.model_dump(),
        }


def _settings_dict(settings: MergeSettings) -> dict:
    values = asdict(settings)
    if isinstance(values.get("tau"), tuple):
        values["tau"] = list(values["tau"])
    return values


class InferenceService:
    """Owns the scheduler and the workers. `start` loads in a background thread; `ready` says when done."""

    def __init__(self, config: ServingConfig, metrics: Metrics, warmup: bool = True, torch_threads: int = 1):
        self.config = config
        self.torch_threads = torch_threads
        self.metrics = metrics
        self.warmup = warmup
        depth_gauges: dict[tuple[str, str], Any] = {}

        def on_depth(model: str, variant: str, depth: int) -> None:  # per queue change: labels() only once
            gauge = depth_gauges.get((model, variant))
            if gauge is None:
                gauge = depth_gauges[model, variant] = metrics.queue_depth.labels(model, variant)
            gauge.set(depth)

        self.scheduler = Scheduler({name: m.batching for name, m in config.models.items()}, on_depth=on_depth)
        self.models: dict[str, ModelInfo] = {}
        self.transforms: dict[str, HostTransform] = {}
        self.workers: list[DeviceWorker] = []
        self.ready = threading.Event()
        self.failed: BaseException | None = None
        self._loader: threading.Thread | None = None

    def start(self, on_failure=None) -> None:
        def load() -> None:
            try:
                self._load_and_start()
            except BaseException as exc:
                log.exception("loading the models failed")
                self.failed = exc
                if on_failure is not None:
                    on_failure(exc)

        self._loader = threading.Thread(target=load, name="model-loader", daemon=True)
        self._loader.start()

    def _load_and_start(self) -> None:
        started = time.monotonic()
        per_device: dict[torch.device, dict[str, DeviceModel]] = {}
        for name, cfg in self.config.models.items():
            loaded: LoadedModel = load_model(name, cfg)
            devices = resolve_devices(cfg.device)
            dtypes = {str(resolve_dtype(cfg.dtype, d)).removeprefix("torch.") for d in devices}
            for i, device in enumerate(devices):
                dm = place_model(name, loaded.model, device, resolve_dtype(cfg.dtype, device), loaded.input_size,
                                 copy_weights=i < len(devices) - 1, mean=loaded.transform.mean,
                                 std=loaded.transform.std)
                per_device.setdefault(device, {})[name] = dm
            info = ModelInfo(name, cfg.arch, loaded.weights, [str(d) for d in devices], ",".join(sorted(dtypes)),
                             loaded.input_size, loaded.labels)
            self.models[name] = info
            self.transforms[name] = loaded.transform
            self.metrics.model_info.labels(name, cfg.arch, info.weights, info.device_label, info.dtype).set(1)
            log.info("model %s: %s, weights %s, on %s (%s)", name, cfg.arch, info.weights,
                     info.device_label, info.dtype)
        torch.set_num_threads(self.torch_threads)  # this thread warms up; each worker sets its own
        self.workers = [DeviceWorker(device, models, self.scheduler, self.metrics, self.torch_threads)
                        for device, models in per_device.items()]
        if self.warmup:
            variants = {name: dict(cfg.variants) for name, cfg in self.config.models.items()}
            max_batch = {name: cfg.batching.max_batch_size for name, cfg in self.config.models.items()}
            for worker in self.workers:
                worker.warm_up(variants, max_batch)
        for worker in self.workers:
            worker.start()
        self.ready.set()
        log.info("ready: %d model(s) on %d worker(s) after %.1f s", len(self.models), len(self.workers),
                 time.monotonic() - started)

    def preprocess(self, model: str, data: bytes, max_pixels: int) -> torch.Tensor:
        """Image bytes -> the uint8 [3, H, W] tensor the model's batches are made of (runs in a thread pool)."""
        transform = self.transforms[model]
        return transform(decode_image(data, max_pixels, needed_edge=transform.resize_edge))

    def submit(self, model: str, variant: str, images: list[torch.Tensor], top_k: int,
               deadline: float) -> list[WorkItem]:
        """Queue a request's images (all or none: raises QueueFull or SchedulerClosed)."""
        loop = asyncio.get_running_loop()
        settings = self.config.models[model].variants[variant]
        items = [WorkItem(model, variant, settings, image, top_k, deadline, loop.create_future(), loop)
                 for image in images]
        self.scheduler.submit(items)
        return items

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop taking work, let the workers answer everything queued, then return."""
        self.scheduler.close()
        for worker in self.workers:
            worker.join(timeout_s)
