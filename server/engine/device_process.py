"""A device's batches in a child process of its own (the default for CUDA devices).

Why: in one process the device worker shares the GIL with the event loop and the preprocessing threads. A
forward launches hundreds of kernels, each a GIL release and re-acquire, and with the event loop busy each
re-acquire can wait up to the interpreter's switch interval (5 ms), so a fast GPU is left idle. In a child
process the forward has an interpreter to itself.

The parent keeps everything else (HTTP, decoding, scheduling, metrics); its worker threads only move
batches. Images cross as uint8 in shared memory slabs (page-locked on a GPU, so the copy to the device is
asynchronous), answers come back as small arrays through a pipe. Two slabs per device: the next batch is
filled while the child runs the current one, so the device does not wait for the host. Crops that the
front-ends left in their shared-memory arenas are copied into the slab by the child's stager thread (the
parent's one interpreter serves every request and copies none of them); others, the parent stacks there.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import tempfile
import threading
import time
import traceback
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.connection import Connection
from queue import SimpleQueue
from typing import Any, NoReturn

import torch
import torch.multiprocessing as mp

from mame_core import MergeSettings
from server.config import ConfigError, ModelConfig
from server.decode.transforms import HostTransform
from server.engine.batching import Scheduler, WorkItem
from server.engine.devices import place_model, resolve_dtype
from server.engine.metrics import Metrics
from server.engine.models import LoadedModel, load_model
from server.engine.shared_crops import SharedCrops
from server.engine.worker import (
    Explanation,
    as_rows,
    batch_view,
    by_input_kind,
    drop_expired,
    explain_image,
    fail_batch,
    infer,
    resolve_batch,
    split_on_oom,
    stack_into,
    warm_up_sizes,
)
from server.wire.errors import ApiError

log = logging.getLogger("mame.server")

SLABS = 2  # batches in flight per device: one running, one being filled
STOP_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class ModelDescription:
    """What the parent needs of a model the child loaded (everything but the weights)."""

    weights: str
    labels: list[str]
    transform: HostTransform
    input_size: tuple[int, int, int]
    depth: int  # blocks
    patch_grid: tuple[int, int]  # patches per column and row

    @classmethod
    def of(cls, loaded: LoadedModel) -> ModelDescription:
        model = loaded.model
        return cls(loaded.weights, loaded.labels, loaded.transform, loaded.input_size, len(model.blocks),
                   tuple(model.patch_embed.grid_size))


class DeviceProcessError(RuntimeError):
    """The device process failed to start or died."""


@dataclass(frozen=True)
class WarmUp:
    """The variants each model runs once per warm-up batch size (up to its batching.max_batch_size)."""

    variants: dict[str, list[MergeSettings]]


# The longest Unix socket path (sun_path less its NUL), and what multiprocessing adds to a temp dir for the
# sockets through which the child shares its slabs ("/pymp-XXXXXXXX/listener-XXXXXXXX", 32), with room.
UNIX_PATH_MAX = 107
SOCKET_SUFFIX_BYTES = 40


def socket_safe_tempdir() -> str | None:
    """Where the child's multiprocessing temp dir goes: the system's (None: TMPDIR's), unless its sockets'
    paths would be too long there (a long TMPDIR); then /tmp."""
    if len(os.fsencode(tempfile.gettempdir())) + SOCKET_SUFFIX_BYTES <= UNIX_PATH_MAX:
        return None
    log.warning("the temp dir %s is too long a path for Unix sockets: the device process uses /tmp",
                tempfile.gettempdir())
    return "/tmp"


def _exit_orphaned(tempdir: str) -> NoReturn:
    """The server is gone: exit now, removing what it would have removed (it may have been killed)."""
    shutil.rmtree(tempdir, ignore_errors=True)
    os._exit(0)


def _exit_when_orphaned(parent: int, tempdir: str) -> None:
    # Killed or stopped while this process loads: otherwise it would load and warm up for nothing, holding
    # the device, and then fail to say "ready" to no one.
    while os.getppid() == parent:
        time.sleep(0.25)
    _exit_orphaned(tempdir)


def _load(device: torch.device, models: dict[str, ModelConfig], warm_up: WarmUp | None):
    """The models placed on the device, their descriptions for the parent, and the shared-memory slabs."""
    placed, described = {}, {}
    for name, cfg in models.items():
        loaded = load_model(name, cfg)
        placed[name] = place_model(name, loaded.model, device, resolve_dtype(cfg.dtype, device),
                                   loaded.input_size, copy_weights=False, mean=loaded.transform.mean,
                                   std=loaded.transform.std)
        described[name] = ModelDescription.of(loaded)
    slab_bytes = max(cfg.batching.max_batch_size * math.prod(described[name].input_size)
                     for name, cfg in models.items())
    slabs = [torch.empty(slab_bytes, dtype=torch.uint8).share_memory_() for _ in range(SLABS)]
    if device.type == "cuda":
        for slab in slabs:  # page-locked: the copy to the device is asynchronous and runs at full speed
            torch.cuda.check_error(torch.cuda.cudart().cudaHostRegister(slab.data_ptr(), slab_bytes, 0))
    if warm_up is not None:
        for name, dm in placed.items():
            for settings in warm_up.variants[name]:
                for size in warm_up_sizes(device, models[name].batching.max_batch_size):
                    infer(dm, settings, torch.randint(0, 256, (size, *dm.input_size), dtype=torch.uint8), 1)
    return placed, described, slabs


def _run_batch(device: torch.device, dm, slabs: list[torch.Tensor], message: tuple) -> tuple:
    """One batch from the parent: its answer for the pipe."""
    _, slab, _, settings, size, top_k, channels_last, floats, _ = message
    # as the parent stacked it; float32 images (rare) come in the message
    x = batch_view(slabs[slab], size, dm.input_size, channels_last) if floats is None \
        else torch.from_numpy(floats)

    def run(start: int, stop: int) -> tuple[Any, float]:
        started = time.monotonic()
        # as lists: torch tensors would each get a shared memory file
        outputs = as_rows(infer(dm, settings, x[start:stop], top_k))
        return outputs, time.monotonic() - started

    try:
        return "done", slab, split_on_oom(run, 0, size, device)
    except Exception as exc:
        log.exception("device process %s: a batch of %d failed", device, size)  # the traceback, here
        return "error", slab, f"{type(exc).__name__}: {exc}"


def _child_main(device_name: str, models: dict[str, ModelConfig], torch_threads: int, warm_up: WarmUp | None,
                commands: Connection, answers: Connection, parent: int, log_level: int, tempdir: str) -> None:
    # The parent drains on Ctrl-C or SIGTERM and then stops this process; were it to die with the parent's
    # signal, the batches already accepted would be lost. It ends when the parent dies (end of the pipe, or
    # a new parent process id while it loads).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # As the server logs (a spawned child has no handler: only bare WARNING lines would show).
    logging.basicConfig(level=log_level,
                        format="%(asctime)s %(levelname)s %(name)s[device %(process)d]: %(message)s")
    # multiprocessing's temp dir here (the listener that hands the slabs over) is one the server made, and
    # removes when this process is killed and cannot. Set where multiprocessing.util.get_temp_dir looks for
    # it: a dir inside it would lengthen the listener's path, which must fit in 107 bytes.
    mp.current_process()._config["tempdir"] = tempdir
    threading.Thread(
        target=_exit_when_orphaned, args=(parent, tempdir), name="orphan-watch", daemon=True
    ).start()

    def send(message: tuple) -> None:
        try:
            answers.send(message)
        except BrokenPipeError:  # the server is gone
            _exit_orphaned(tempdir)

    torch.set_num_threads(torch_threads)
    device = torch.device(device_name)
    try:
        placed, described, slabs = _load(device, models, warm_up)
        send(("ready", described, slabs))
    except ConfigError as exc:  # e.g. a weights file that does not load: the parent says so in one line
        send(("config", str(exc)))
        return
    except Exception as exc:  # noqa: BLE001 - any load failure is reported to the parent, which refuses to start
        send(("failed", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        return
    staged: SimpleQueue[tuple | None] = SimpleQueue()
    crop_bytes = {name: math.prod(dm.input_size) for name, dm in placed.items()}
    threading.Thread(target=_stage, args=(commands, staged, slabs, crop_bytes), name="stager",
                     daemon=True).start()
    while True:
        message = staged.get()
        if message is None:  # the parent is gone
            _exit_orphaned(tempdir)
        if message[0] == "stop":
            send(("stopped",))
            return
        if message[0] == "explain":
            send(_explain(placed, message))
            continue
        if message[0] == "unreadable":
            send(message)
            continue
        send(_run_batch(device, placed[message[2]], slabs, message))


def _stage(commands: Connection, staged: SimpleQueue, slabs: list[torch.Tensor],
           crop_bytes: dict[str, int]) -> None:
    """The parent's commands, read ahead of the forward: a batch whose crops lie in shared memory is copied
    into its slab here while the device runs the batch before it. A crop that cannot be read (its
    front-end has ended, and its file is gone) makes the batch "unreadable": the parent stacks it."""
    shared = SharedCrops()
    while True:
        try:
            message = commands.recv()
        except EOFError:
            staged.put(None)
            return
        if message[0] == "run" and message[8] is not None:
            try:
                shared.gather(message[8], crop_bytes[message[2]], slabs[message[1]])
            except (OSError, ValueError) as exc:
                log.warning("device process: a batch's crops could not be read in shared memory (%s); "
                            "the server copies them", exc)
                message = ("unreadable", message[1])
        staged.put(message)
        if message[0] == "stop":
            return


def _explain(placed: dict, message: tuple) -> tuple:
    """One image's explanation (server/http/explain.py) between batches: its answer for the pipe."""
    _, number, model, settings, crop, blocks = message
    try:
        return "explained", number, explain_image(placed[model], settings, torch.from_numpy(crop), blocks)
    except Exception as exc:
        log.exception("device process: an explanation failed")
        return "explained", number, f"{type(exc).__name__}: {exc}"


class ProcessWorker:
    """The parent's side of one device process: feeds it batches from the scheduler, answers the items."""

    def __init__(self, device: torch.device, models: dict[str, ModelConfig], scheduler: Scheduler,
                 metrics: Metrics, torch_threads: int, on_death=None):
        self.device = device
        self.models = models
        self.scheduler = scheduler
        self.metrics = metrics
        self.torch_threads = torch_threads
        self.on_death = on_death or (lambda exc: None)
        self.described: dict[str, ModelDescription] = {}
        self._slabs: list[torch.Tensor] = []
        self._free: SimpleQueue[int] = SimpleQueue()
        self._in_flight: dict[int, list[WorkItem]] = {}
        self._explaining: dict[int, Future[Explanation]] = {}  # explanations asked of the child, by number
        self._explanations = 0
        self._send_lock = threading.Lock()  # the feeder and explain() both send commands
        self._progress_at = 0.0  # when the device last finished a batch, or was given one while idle
        self._lock = threading.Lock()
        self._stopping = False
        self._dead: DeviceProcessError | ApiError | None = None  # ApiError: stalled, ended by the watchdog
        self._process = None
        self._tempdir = ""
        self._feeder = threading.Thread(target=self._feed, name=f"feeder-{device}", daemon=True)
        self._receiver = threading.Thread(target=self._receive, name=f"receiver-{device}", daemon=True)

    def launch(self, warm_up: WarmUp | None, timeout_s: float = 3600.0) -> dict[str, ModelDescription]:
        """Start the child; return once it has loaded (and warmed up) its models."""
        self.spawn(warm_up)
        return self.wait_loaded(timeout_s)

    def spawn(self, warm_up: WarmUp | None) -> None:
        """Start the child loading (several devices load at the same time: spawn each, then wait for each)."""
        ctx = mp.get_context("spawn")  # never fork a process that holds threads (and maybe CUDA)
        command_in, command_out = ctx.Pipe(duplex=False)
        answer_in, answer_out = ctx.Pipe(duplex=False)
        # the child's multiprocessing temp dir
        self._tempdir = tempfile.mkdtemp(prefix="pymp-", dir=socket_safe_tempdir())
        self._process = ctx.Process(
            target=_child_main,
            name=f"mame-device-{self.device}",
            daemon=True,
            args=(
                str(self.device),
                self.models,
                self.torch_threads,
                warm_up,
                command_in,
                answer_out,
                os.getpid(),
                log.getEffectiveLevel(),
                self._tempdir,
            ),
        )  # the server's --log-level
        self._process.start()
        command_in.close()
        answer_out.close()
        self._commands, self._answers = command_out, answer_in

    def wait_loaded(self, timeout_s: float = 3600.0) -> dict[str, ModelDescription]:
        """Wait until the child has loaded and warmed up its models; what it loaded."""
        deadline = time.monotonic() + timeout_s
        try:
            while not self._answers.poll(0.5):
                if not self._process.is_alive():
                    raise DeviceProcessError(f"the device process for {self.device} exited with "
                                             f"{self._process.exitcode} while loading")
                if time.monotonic() > deadline:
                    raise DeviceProcessError(
                        f"the device process for {self.device} did not load in {timeout_s} s"
                    )
            message = self._answers.recv()
        except EOFError:
            self.end(10)
            raise DeviceProcessError(f"the device process for {self.device} exited while loading") from None
        except DeviceProcessError:
            self.end(0)
            raise
        if message[0] == "config":
            self.end(10)
            raise ConfigError(message[1])
        if message[0] == "failed":
            self.end(10)
            raise DeviceProcessError(f"{message[1]}\n(device process {self.device}) {message[2]}")
        _, self.described, self._slabs = message
        for slab in range(len(self._slabs)):
            self._free.put(slab)
        return self.described

    def end(self, timeout_s: float = 0) -> None:
        """Wait up to timeout_s for the child to exit, then kill it; remove its temp dir."""
        if self._process is not None:
            self._process.join(timeout_s)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(5)
        if self._tempdir:
            shutil.rmtree(self._tempdir, ignore_errors=True)

    def start(self) -> None:
        self._receiver.start()
        self._feeder.start()

    def join(self, timeout_s: float | None = None) -> None:
        self._feeder.join(timeout_s)
        self._receiver.join(timeout_s)

    def _feed(self) -> None:
        # The stack into the slab is a memory copy that overlaps with the device's work: an OpenMP pool here
        # (torch's thread count is per thread, from OMP_NUM_THREADS) would spin on cores the decoding needs.
        torch.set_num_threads(1)
        while True:
            # A batch is taken once the device can have it: while both slabs are in flight, it fills up.
            slab: int | None = self._free.get()
            batch = self.scheduler.next_batch(self.models.keys())
            if batch is None:
                self._free.put(slab)
                break
            for items in by_input_kind(drop_expired(batch)):
                self._send_batch(items, self._free.get() if slab is None else slab)
                slab = None
            if slab is not None:  # every image of the batch had expired
                self._free.put(slab)
        for _ in range(len(self._slabs)):  # every batch sent has been answered
            self._free.get()
        with self._lock:  # no explanation is sent after the stop (explain() refuses from now)
            self._stopping = True
        self._send(("stop",))
        self.end(STOP_TIMEOUT_S)
        log.info("worker %s: queue drained, device process stopped", self.device)

    def _send(self, command: tuple) -> None:
        try:
            with self._send_lock:
                self._commands.send(command)
        except (OSError, ValueError):  # the child is gone: the receiver fails what is in flight
            pass

    def _send_batch(self, items: list[WorkItem], slab: int) -> None:
        """One batch of one input dtype to the child in `slab`: uint8 crops in shared memory by where they lie
        (the child copies them into the slab), other uint8 crops stacked into the slab here, float32 images
        (the protocol's normalised pixel_values, rare) by value in the message."""
        first, floats, channels_last = items[0], None, False
        shared_at = [item.shared_at for item in items]
        try:
            if tuple(first.image.shape) != self.described[first.model].input_size:
                raise ValueError(f"image of shape {tuple(first.image.shape)} for a model of input size "
                                 f"{self.described[first.model].input_size}")
            if first.image.dtype == torch.uint8 and None not in shared_at:
                channels_last = True  # an arena's crops are [H, W, 3]
            elif first.image.dtype == torch.uint8:
                shared_at = None
                _, channels_last = stack_into([item.image for item in items], self._slabs[slab])
            else:
                shared_at = None
                floats = torch.stack([item.image for item in items]).numpy()
        except Exception as exc:  # noqa: BLE001 - e.g. an image of the wrong shape: only this batch fails
            fail_batch(items, exc, self.device)
            self._free.put(slab)
            return
        # "Dead?" and "in flight" under one lock: a batch recorded after the receiver swept would wait for
        # its deadline, and its slab would be lost (the drain in _feed would then wait for ever).
        with self._lock:
            dead = self._dead
            if dead is None:
                if not self._in_flight:
                    self._progress_at = time.monotonic()
                self._in_flight[slab] = items
        if dead is not None:
            fail_batch(items, dead if isinstance(dead, ApiError) else str(dead), self.device)
            self._free.put(slab)
            return
        self._send(self._run_command(slab, items, channels_last, floats, shared_at))

    @staticmethod
    def _run_command(slab: int, items: list[WorkItem], channels_last: bool, floats, shared_at) -> tuple:
        first = items[0]
        return ("run", slab, first.model, first.settings, len(items), max(item.top_k for item in items),
                channels_last, floats, shared_at)

    def _send_stacked(self, slab: int) -> None:
        """The child could not read a batch's crops in shared memory: this process stacks them (its views of
        the arenas stay valid after their files are gone) and sends the batch again in the same slab."""
        with self._lock:
            items = self._in_flight.get(slab)
        if items is None:  # swept: the child has died or stalled meanwhile
            return
        try:
            _, channels_last = stack_into([item.image for item in items], self._slabs[slab])
        except Exception as exc:  # noqa: BLE001 - only this batch fails
            with self._lock:
                self._in_flight.pop(slab, None)
            fail_batch(items, exc, self.device)
            self._free.put(slab)
            return
        self._send(self._run_command(slab, items, channels_last, None, None))

    def explain(self, model: str, settings: MergeSettings, crop: torch.Tensor,
                blocks: list[int]) -> Future[Explanation]:
        """One image's explanation, run by the child between two batches."""
        answer: Future[Explanation] = Future()
        with self._lock:
            if self._dead is not None or self._stopping:
                answer.set_exception(DeviceProcessError(f"the device process for {self.device} has stopped"))
                return answer
            self._explanations += 1
            number = self._explanations
            self._explaining[number] = answer
        self._send(("explain", number, model, settings, crop.contiguous().numpy(), blocks))
        return answer

    def _receive(self) -> None:
        device = str(self.device)
        while True:
            try:
                message = self._answers.recv()
            except (EOFError, OSError):
                break
            if message[0] == "stopped":
                self._fail_explanations(DeviceProcessError(f"the device process for {self.device} stopped"))
                return
            if message[0] == "explained":
                self._explained(message[1], message[2])
                continue
            slab = message[1]
            if message[0] == "unreadable":
                self._send_stacked(slab)
                continue
            with self._lock:
                items = self._in_flight.pop(slab)
                self._progress_at = time.monotonic()
            if message[0] == "done":
                for start, stop, (outputs, inference_s) in message[2]:
                    resolve_batch(items[start:stop], outputs, inference_s, device, self.metrics)
            else:
                fail_batch(items, message[2], self.device)
            self._free.put(slab)
        # The pipe ended without a "stopped": the child died (killed, out of host memory, a crash).
        self.end(1)  # reaped, so that its exit code is known; its temp dir removed
        exitcode = self._process.exitcode if self._process is not None else None
        dead = DeviceProcessError(f"the device process for {self.device} died (exit code {exitcode})")
        with self._lock:
            stalled = isinstance(self._dead, ApiError)  # ended by the watchdog: its error stands
            if not stalled:
                log.error("%s", dead)
                self._dead = dead
            lost, self._in_flight = list(self._in_flight.items()), {}
            error = self._dead
        for slab, items in lost:
            fail_batch(items, error if stalled else str(error), self.device)
            self._free.put(slab)
        self._fail_explanations(error)
        if not self._stopping and not stalled:
            self.on_death(error)

    def _explained(self, number: int, outcome: Explanation | str) -> None:
        with self._lock:
            answer = self._explaining.pop(number, None)
        if answer is None:
            return
        if isinstance(outcome, str):
            answer.set_exception(RuntimeError(f"the explanation failed on {self.device}: {outcome}"))
        else:
            answer.set_result(outcome)

    def _fail_explanations(self, error: BaseException) -> None:
        with self._lock:
            pending, self._explaining = list(self._explaining.values()), {}
        for answer in pending:
            answer.set_exception(error)

    def busy_for(self, now: float) -> float:
        """Seconds the device process has had batches without finishing one (0: idle). Read by the
        watchdog."""
        with self._lock:
            return now - self._progress_at if self._in_flight and self._dead is None else 0.0

    def stall(self, error: ApiError) -> None:
        """The watchdog found the device process stalled: what it holds and what comes answers `error`, and
        the process is killed (SIGKILL ends a stopped or hung process too)."""
        with self._lock:
            self._dead = error
            held = [item for items in self._in_flight.values() for item in items]
        fail_batch(held, error, self.device)
        if self._process is not None and self._process.is_alive():
            self._process.kill()
