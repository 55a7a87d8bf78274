"""The inference service: loads the models, runs the device workers and takes images for inference."""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from concurrent.futures import Executor, Future
from dataclasses import asdict, dataclass

import torch
from PIL import Image

from mame_core import MergeSettings
from server.config import ConfigError, ServingConfig
from server.decode.imaging import decode_opened, release_pixels
from server.decode.transforms import HostTransform
from server.engine.batching import Reservation, Scheduler, WorkItem
from server.engine.device_process import ModelDescription, ProcessWorker, WarmUp
from server.engine.devices import DeviceModel, place_model, resolve_devices, resolve_dtype
from server.engine.metrics import Metrics
from server.engine.models import LoadedModel, load_model
from server.engine.worker import DeviceWorker, Explanation
from server.wire.errors import ApiError, device_stalled

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
    depth: int  # blocks
    patch_grid: tuple[int, int]  # patches per column and row

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

    def __init__(self, config: ServingConfig, metrics: Metrics, warmup: bool = True, torch_threads: int = 1,
                 device_processes: bool = False):
        self.config = config
        self.device_processes = device_processes  # each device runs its batches in a process of its own
        self.torch_threads = torch_threads
        self.metrics = metrics
        self.warmup = warmup
        models = config.models.items()
        self.scheduler = Scheduler({name: m.batching for name, m in models},
                                   guarantees={name: m.queue_guarantees() for name, m in models})
        # Read at each scrape: a gauge set on every queue change cost the request path a call per request.
        for name, model_config in models:
            for variant in model_config.variants:
                metrics.queue_depth.labels(name, variant).set_function(
                    functools.partial(self.scheduler.depth, name, variant))
        self.models: dict[str, ModelInfo] = {}
        self.transforms: dict[str, HostTransform] = {}
        self.workers: list[DeviceWorker | ProcessWorker] = []
        self._on_failure = None
        self.ready = threading.Event()
        self.failed: BaseException | None = None
        self._loader: threading.Thread | None = None
        self._spawned: list[ProcessWorker] = []  # device processes, loaded or still loading
        self._stopping = False
        self._lock = threading.Lock()  # stop() against the loader's starting the workers
        # device -> why: workers the watchdog found stalled; replaced, never changed, as the loop reads it
        self.stalled: dict[str, str] = {}
        self._watchdog_stop = threading.Event()

    @property
    def loading(self) -> bool:
        return self._loader is not None and self._loader.is_alive()

    def start(self, on_failure=None) -> None:
        self._on_failure = on_failure
        def load() -> None:
            try:
                self._load_and_start()
            except BaseException as exc:
                if self._stopping:  # stop() ended the loading (the server stops): nothing failed
                    log.info("loading stopped: the server is stopping")
                    return
                # the config's fault: one line, as for the checks before loading
                if isinstance(exc, ConfigError):
                    log.error("loading the models failed: %s", exc)
                else:
                    log.exception("loading the models failed")
                self.failed = exc
                if on_failure is not None:
                    on_failure(exc)

        self._loader = threading.Thread(target=load, name="model-loader", daemon=True)
        self._loader.start()

    def _load_and_start(self) -> None:
        started = time.monotonic()
        devices_of = {name: resolve_devices(cfg.device) for name, cfg in self.config.models.items()}
        all_devices = list(dict.fromkeys(d for devices in devices_of.values() for d in devices))
        variants = {name: dict(cfg.variants) for name, cfg in self.config.models.items()}
        max_batch = {name: cfg.batching.max_batch_size for name, cfg in self.config.models.items()}
        described: dict[str, ModelDescription] = {}
        remote = self._start_device_processes(devices_of, all_devices, variants, described)
        local = self._load_in_process(devices_of, all_devices, variants, max_batch, described)
        workers = [*remote, *local]
        for name, cfg in self.config.models.items():
            devices, d = devices_of[name], described[name]
            dtypes = {str(resolve_dtype(cfg.dtype, device)).removeprefix("torch.") for device in devices}
            info = ModelInfo(name, cfg.arch, d.weights, [str(device) for device in devices],
                             ",".join(sorted(dtypes)), d.input_size, d.labels, d.depth, d.patch_grid)
            self.models[name] = info
            self.transforms[name] = d.transform
            self.metrics.model_info.labels(name, cfg.arch, info.weights, info.device_label, info.dtype).set(1)
            log.info("model %s: %s, weights %s, on %s (%s)", name, cfg.arch, info.weights,
                     info.device_label, info.dtype)
        with self._lock:
            if self._stopping:  # stop() came while loading and has ended the device processes: start nothing
                return
            self.workers = workers
            for worker in self.workers:
                worker.start()
            self.ready.set()
            threading.Thread(target=self._watch, name="device-watchdog", daemon=True).start()
        log.info("ready: %d model(s) on %d worker(s) (%d in a device process) after %.1f s",
                 len(self.models), len(self.workers), len(remote), time.monotonic() - started)

    def _start_device_processes(self, devices_of, all_devices, variants,
                                described: dict[str, ModelDescription]) -> list[ProcessWorker]:
        """Devices with a process of their own: each child loads the weights (all at the same time) and
        warms up; the parent gets the models' descriptions."""
        spawned = []
        for device in all_devices if self.device_processes else []:
            names = [name for name, devices in devices_of.items() if device in devices]
            worker = ProcessWorker(device, {name: self.config.models[name] for name in names}, self.scheduler,
                                   self.metrics, self.torch_threads, on_death=self._on_death)
            with self._lock:  # so that stop() ends every one it spawned
                if self._stopping:
                    raise RuntimeError("the server is stopping")
                worker.spawn(WarmUp({n: list(variants[n].values()) for n in names}) if self.warmup
                             else None)
                self._spawned.append(worker)
            spawned.append(worker)
        for worker in spawned:
            for name, description in worker.wait_loaded().items():
                described.setdefault(name, description)
        return spawned

    def _load_in_process(self, devices_of, all_devices, variants, max_batch,
                         described: dict[str, ModelDescription]) -> list[DeviceWorker]:
        """The other devices: one worker thread each in this process, sharing one CPU copy of the weights."""
        in_process = [] if self.device_processes else all_devices
        per_device: dict[torch.device, dict[str, DeviceModel]] = {}
        for name, cfg in self.config.models.items():
            here = [d for d in devices_of[name] if d in in_process]
            if not here:
                continue
            loaded: LoadedModel = load_model(name, cfg)
            described.setdefault(name, ModelDescription.of(loaded))
            for i, device in enumerate(here):
                dm = place_model(
                    name,
                    loaded.model,
                    device,
                    resolve_dtype(cfg.dtype, device),
                    loaded.input_size,
                    copy_weights=i < len(here) - 1,
                    mean=loaded.transform.mean,
                    std=loaded.transform.std,
                )
                per_device.setdefault(device, {})[name] = dm
        torch.set_num_threads(self.torch_threads)  # this thread warms up; each worker sets its own
        local = [DeviceWorker(device, models, self.scheduler, self.metrics, self.torch_threads)
                 for device, models in per_device.items()]
        if self.warmup:
            for worker in local:
                worker.warm_up(variants, max_batch)
        return local

    def _watch(self) -> None:
        """The watchdog: a worker that has had a batch for `health.device_stall_s` without finishing one is
        stalled. Its requests, running and queued, answer 503 `device_stalled` and /readyz says so. A device
        process is then killed and the server stops (as when one dies: its supervisor restarts it); a worker
        thread cannot be killed, so in one process the server is ready again once the thread finishes a
        batch (docs/architecture.md)."""
        stall_s = self.config.health.device_stall_s
        while not self._watchdog_stop.wait(min(0.1, stall_s / 4)):
            now = time.monotonic()
            for worker in self.workers:
                busy_s, device = worker.busy_for(now), str(worker.device)
                if busy_s >= stall_s and device not in self.stalled:
                    self._stalled(worker, busy_s)
                elif busy_s < stall_s and device in self.stalled and self.failed is None:
                    log.warning("device %s finishes batches again: ready", device)
                    self.stalled = {d: why for d, why in self.stalled.items() if d != device}

    def _stalled(self, worker: DeviceWorker | ProcessWorker, busy_s: float) -> None:
        device = str(worker.device)
        reason = (f"device {device} finished no batch in {busy_s:.1f} s "
                  f"(health.device_stall_s: {self.config.health.device_stall_s:g})")
        error = device_stalled(reason)
        self.stalled = {**self.stalled, device: reason}
        log.error("watchdog: %s", reason)
        worker.stall(error)
        models = [name for name in worker.models
                  if all(str(w.device) in self.stalled for w in self.workers if name in w.models)]
        self.scheduler.fail_queued(models, error)
        if isinstance(worker, ProcessWorker):  # killed: the server stops for its supervisor to restart it
            self._on_death(RuntimeError(reason))

    def stalled_error(self, model: str) -> ApiError | None:
        """503 `device_stalled` when every device of `model` is stalled."""
        stalled = self.stalled
        if not stalled:
            return None
        devices = self.models[model].devices if model in self.models else []
        if devices and all(device in stalled for device in devices):
            return device_stalled("; ".join(stalled[device] for device in devices))
        return None

    def _on_death(self, exc: BaseException) -> None:
        """A device process died: the server is no longer ready, and it stops (its orchestrator restarts
        it)."""
        if self.failed is None:
            self.failed = exc
        if self._on_failure is not None:
            self._on_failure(exc)

    def preprocess_opened(self, model: str, image: Image.Image) -> torch.Tensor:
        """An image opened by `open_image` (header read, JPEG draft set) -> the model's uint8 crop."""
        transform = self.transforms[model]
        try:
            return transform(decode_opened(image, transform.resize_edge))
        finally:
            release_pixels(image)

    def explain(self, model: str, settings: MergeSettings, crop: torch.Tensor, blocks: list[int],
                executor: Executor) -> Future[Explanation]:
        """One image's forward with its source maps (`POST /v1/explain`), on a device of `model` that is not
        stalled: in `executor` on the weights this process holds, or in the device's process."""
        if (stalled := self.stalled_error(model)) is not None:
            raise stalled
        worker = next(w for w in self.workers if model in w.models and str(w.device) not in self.stalled)
        if isinstance(worker, DeviceWorker):
            return worker.explain(model, settings, crop, blocks, executor)
        return worker.explain(model, settings, crop, blocks)

    def submit(self, model: str, variant: str, images: list[torch.Tensor], top_k: int,
               deadline: float, reservation: Reservation | None = None,
               shared_at: list[tuple[str, int]] | None = None) -> list[WorkItem]:
        """Queue a request's images (all or none: raises QueueFull or SchedulerClosed), in the places
        `reservation` holds for them if given. `shared_at`: where each image lies in shared memory, if it
        does (WorkItem.shared_at)."""
        if (stalled := self.stalled_error(model)) is not None:
            raise stalled
        loop = asyncio.get_running_loop()
        settings = self.config.models[model].variants[variant]
        items = [WorkItem(model, variant, settings, image, top_k, deadline, loop.create_future(), loop,
                          shared_at=at) for image, at in zip(images, shared_at or [None] * len(images))]
        self.scheduler.submit(items, reservation=reservation)
        return items

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop taking work, let the workers answer everything queued, then return."""
        self._watchdog_stop.set()
        with self._lock:
            self._stopping = True
            loading = [worker for worker in self._spawned if worker not in self.workers]
        for worker in loading:  # still loading: nothing to answer, and they must not outlive the server
            worker.end()
        self.scheduler.close()
        for worker in self.workers:
            worker.join(timeout_s)
