"""HTTP front-end processes (`mame-serve --http-processes N`): HTTP and decoding spread over N processes.

Why: one server process tops out at a few thousand images per second however many cores it has, because
its event loop, its decoding and its batch plumbing share one interpreter (measured on an H200 host:
2,189 img/s served against 8,951 offline). With front-ends, the server process (the "engine") keeps what
must be one: the scheduler and the device workers (one copy of the weights per device), the A/B registry,
the metrics. It listens on private Unix sockets. N front-end processes listen on the public port
(SO_REUSEPORT) and, for `POST /v1/classify`, read the body, split multipart, decode and crop each image
(PIL, in threads of their own), then send the uint8 crops (in shared memory) with the request's query and
headers over a framed channel (server/channel.py) to the engine, which answers it as `/internal/classify`.
The engine routes, batches, answers and counts exactly as for a request it decoded itself, so answers,
errors, A/B assignment and metrics are the same; its cost per image is a memory copy. Every other request is passed to the engine as it came.

A request the front-end cannot decode for (an unknown model or experiment, a model whose timm transform is
not the usual resize + centre crop, the engine still loading) goes to the engine undecoded. An error the
front-end meets (body too large, not an image, undecodable) is sent to the engine to answer and count,
after the checks that come first (readiness, parameters, routing). This module imports no torch: a
front-end process is small.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import mmap
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import httpx
import uvicorn
from starlette.datastructures import URL

from server.channel import Channel, ChannelError
from server.decode_child import Decoder, crop_bytes, decoder_from_list, decoder_to_list
from server.errors import ApiError, internal, not_ready
from server.experiments import admin_token_from_env, check_admin
from server.hostpath import (
    head_timeout_protocol,
    image_payloads,
    read_limited,
    request_id_of,
    run_all_in_pool,
    without_reserved,
)
from server.imaging import ResizeCrop

log = logging.getLogger("mame.frontend")
Answer = tuple[int, list[tuple[bytes, bytes]], bytes]  # status, headers, body

# Headers from a front-end to the engine (a client's own x-mame-* headers are dropped on the way in).
FRONTEND_CLIENT = "x-mame-client"  # the client's address (sticky assignment by client)
FRONTEND_STARTED = "x-mame-started"  # time.monotonic() when the front-end took the request
FRONTEND_MODEL = "x-mame-model"  # the model the crops were made for
FRONTEND_IMAGES = "x-mame-images"  # images in the request (counted even when it fails)
FRONTEND_MULTIPART = "x-mame-multipart"  # "1": a multipart request (several images answer as a list)
FRONTEND_ERROR = "x-mame-error"  # JSON {status, code, detail}: what reading or decoding the images raised
FRONTEND_CROPS_AT = "x-mame-crops-at"  # "<arena file> <byte offset> ...": the crops are in shared memory

# Not passed on between a client and the engine: connection-level headers, the length (recomputed), the
# request id (set by the front-end), and the engine's server and date (the front-end's uvicorn adds its own).
_NOT_FORWARDED = {b"connection", b"keep-alive", b"transfer-encoding", b"te", b"trailer", b"upgrade",
                  b"proxy-connection", b"content-length", b"x-request-id", b"date", b"server"}
PASS_THROUGH_MAX_BYTES = 1 << 20  # bodies of requests other than classify (admin JSON): no more
PLAN_MAX_AGE_S = 5.0  # how stale the engine's experiments may be here (a stale one costs a re-send, no error)
LOADING_RECHECK_S = 0.5
ARENA_MIN_SLOTS = 256  # crops in shared memory per front-end (37 MiB at 224 px); more in flight: in messages
QUICK_DEATH_S = 10.0  # a front-end that exits this soon after starting counts as a quick death ...
QUICK_DEATHS_FATAL = 3  # ... and this many in a row stop the server


def decode_plan(transform: Any, input_size: Sequence[int]) -> list | None:
    """A model's decoder as JSON for the front-ends (`decoder_to_list`), when its host transform is the
    fused resize + centre crop to the model's input size (else None)."""
    fused: ResizeCrop | None = transform.resize_then_crop
    if fused is None or tuple(fused.crop) != tuple(input_size[1:]):
        return None
    return decoder_to_list((transform.resize_edge, fused))


@dataclass(frozen=True)
class Plan:
    """What a front-end knows of the engine: limits, model choice, and how to decode for each model."""

    ready: bool
    max_body_bytes: int
    max_pixels: int
    max_images: int
    default_model: str
    experiment_models: dict[str, str]  # running experiments
    decoders: dict[str, Decoder]
    fetched_at: float

    @classmethod
    def from_json(cls, data: dict, fetched_at: float) -> Plan:
        decoders = {name: decoder_from_list(values) for name, values in data["decoders"].items() if values}
        limits = data["limits"]
        return cls(data["ready"], limits["max_body_bytes"], limits["max_pixels"], limits["max_images_per_request"],
                   data["default_model"], data["experiment_models"], decoders, fetched_at)

    def model_for(self, params: dict[str, str]) -> str | None:
        """The model the engine will route a request to (its rule, server/routing.py), if decodable here."""
        experiment = params.get("experiment")
        if experiment is not None:
            model = self.experiment_models.get(experiment)
        else:
            model = params.get("model", self.default_model)
        return model if model in self.decoders else None


class CropArena:
    """Slots for crops in a file in shared memory (/dev/shm) that the engine maps too, so crops reach it
    without passing through its event loop: sent in the request body, 16 crops of 224 px (2.4 MB) cost the
    engine's event loop 2.6 ms per request here, most of its work per image.

    Allocated at once (posix_fallocate): a full /dev/shm fails here, at start, and not as a SIGBUS later.
    Slots are taken and given back on the event loop only; a request that finds too few free slots sends
    its crops in the body. Slots are reused last-freed first, so a light load touches few pages."""

    def __init__(self, directory: str, slot_bytes: int, slots: int):
        fd, self.path = tempfile.mkstemp(prefix=f"crops-{os.getpid()}-", dir=directory)
        try:
            os.posix_fallocate(fd, 0, slot_bytes * slots)
            self.memory = mmap.mmap(fd, slot_bytes * slots)
        except OSError:
            os.unlink(self.path)
            raise
        finally:
            os.close(fd)
        self.slot_bytes = slot_bytes
        self._free = list(range(slots - 1, -1, -1))

    def take(self, count: int) -> list[int] | None:
        if count > len(self._free):
            return None
        taken = self._free[-count:]
        del self._free[-count:]
        return taken

    def give_back(self, slots: list[int]) -> None:
        self._free.extend(reversed(slots))

    def close(self) -> None:
        self.memory.close()
        # missing_ok: an orphaned front-end that stopped first removes the whole directory
        Path(self.path).unlink(missing_ok=True)


def decode_crop(decoder: Decoder, data: bytes, max_pixels: int, arena: CropArena | None = None,
                slot: int = 0) -> bytes:
    """Image bytes -> the model's uint8 crop as [H, W, 3] bytes (the decode processes' `crop_bytes`), or
    written into the arena's `slot` (then b"")."""
    crop = crop_bytes(decoder, data, max_pixels)
    if arena is None:
        return crop
    start = slot * arena.slot_bytes
    arena.memory[start:start + len(crop)] = crop
    return b""


class FrontEnd:
    """The ASGI application of one front-end process."""

    def __init__(self, engine_socket: str, channel_socket: str, threads: int, crops_dir: str | None = None,
                 arena_slots: int | None = None, request_timeout_s: float = 30.0):
        self.engine_socket = engine_socket
        self.request_timeout_s = request_timeout_s  # the serving config's: heads and bodies arrive within it
        self.channel = Channel(channel_socket)
        self.crops_dir = crops_dir if arena_slots != 0 else None
        self.arena_slots = arena_slots
        self.arena: CropArena | None = None
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="decode")
        self.plan: Plan | None = None
        self._plan_lock = asyncio.Lock()
        self.engine: httpx.AsyncClient | None = None
        self.admin_token = admin_token_from_env()  # the engine's: it started this process (read at start, as there)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        request_id = request_id_of(scope["headers"])
        # Optional whitespace around a value is not part of it (RFC 9110 5.5): httptools keeps a trailing one,
        # and h11 refuses to send it on.
        headers = [(k, v.strip(b" \t")) for k, v in without_reserved(scope["headers"])
                   if k not in _NOT_FORWARDED and k != b"host"]
        # The host the engine builds its URLs from (a trailing-slash redirect): the client's when valid, else the
        # address the client reached, as Starlette does in one process; never the engine's own socket or name.
        headers.append((b"host", URL(scope=scope).netloc.encode("latin-1")))
        headers.append((b"x-request-id", request_id.encode()))
        if scope.get("client"):
            headers.append((FRONTEND_CLIENT.encode(), scope["client"][0].encode()))
        # The target exactly as the client sent it: the engine routes it as a one-process server would.
        raw_path = scope.get("raw_path") or scope["path"].encode()
        target = raw_path + (b"?" + scope["query_string"] if scope["query_string"] else b"")
        try:
            if scope["path"].startswith("/internal/"):  # the engine's own routes: not for clients
                raise ApiError(404, "not_found", "Not Found")
            if scope["method"] == "POST" and scope["path"] == "/v1/classify":
                status, answer_headers, body = await self._classify(scope, receive, headers)
            else:
                body = await self._pass_through_body(scope, receive)
                status, answer_headers, body = await self._engine(scope["method"], target, headers, body)
        except httpx.LocalProtocolError as exc:  # a request h11 will not send (the engine is fine): the client's fault
            await respond_error(send, ApiError(400, "http_error", f"the request cannot be passed on: {exc}"),
                                request_id)
            return
        except (httpx.TransportError, ChannelError) as exc:
            log.warning("the engine is not reachable: %s", exc)
            await respond_error(send, not_ready(f"the inference engine is not reachable ({type(exc).__name__})"),
                                request_id)
            return
        except ApiError as exc:
            await respond_error(send, exc, request_id)
            return
        except Exception:  # a bug (or a plan the engine could not give): the contract's 500, not uvicorn's text
            log.exception("request %s failed in the front-end", request_id)
            await respond_error(send, internal(f"unexpected front-end error; the server log has request {request_id}"),
                                request_id)
            return
        # HEAD: the engine's content-length, that of the GET (the body is not sent)
        length = next((int(v) for k, v in answer_headers if k.lower() == b"content-length"), 0) \
            if scope["method"] == "HEAD" else None
        await respond(send, status, [(k, v) for k, v in answer_headers if k.lower() not in _NOT_FORWARDED]
                      + [(b"x-request-id", request_id.encode())], body, length)

    async def _pass_through_body(self, scope: dict, receive: Callable) -> bytes:
        """The body of a request passed on as it came, at most PASS_THROUGH_MAX_BYTES.

        An admin request over it is refused for its token first, as the engine would (the token before the
        body, docs/ab_testing.md). Checked here, with the token the engine has: this process inherits its
        environment. Not by asking the engine with an empty body: a DELETE or GET with the right token would
        then run."""
        try:
            return await read_limited(receive, header(scope["headers"], b"content-length"), PASS_THROUGH_MAX_BYTES,
                                      self.request_timeout_s)
        except ApiError as exc:
            if exc.status == 413 and scope["path"].startswith("/v1/admin/"):
                denied = check_admin(header(scope["headers"], b"authorization"), self.admin_token)
                if denied is not None:
                    raise denied.as_api_error() from None
            raise

    async def _engine(self, method: str, target: bytes, headers: list, body: bytes) -> Answer:
        """A request passed to the engine's HTTP socket as it came (the target unparsed: httpx would drop
        `.` and `..` segments, and the engine must route what the client sent)."""
        assert self.engine is not None
        request = self.engine.build_request(method, "/", headers=headers, content=body,
                                            extensions={"target": target})
        response = await self.engine.send(request)
        return response.status_code, response.headers.raw, response.content

    async def _decoded(self, query: str, headers: list, body: bytes) -> Answer:
        """A request whose images this front-end decoded, over the channel to the engine's /internal/classify."""
        head, answer = await self.channel.call(
            {"query": query, "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in headers]}, body)
        return head["status"], [(k.encode("latin-1"), v.encode("latin-1")) for k, v in head["headers"]], answer

    async def _classify(self, scope: dict, receive: Callable, headers: list) -> Answer:
        started = time.monotonic()
        query = scope["query_string"].decode("latin-1")
        plan = await self._current_plan()
        model = plan.model_for(dict(parse_qsl(query, keep_blank_values=True)))
        body, error, n_images, slots, crops = b"", None, 0, None, []
        try:
            body = await read_limited(receive, header(scope["headers"], b"content-length"), plan.max_body_bytes,
                                      max(0.0, started + self.request_timeout_s - time.monotonic()))
            payloads, multipart = image_payloads(header(headers, b"content-type"), body, plan.max_images)
            n_images = len(payloads)
            if model is not None:
                slots = self.arena.take(len(payloads)) if self.arena is not None else None
                arena = self.arena if slots is not None else None
                crops = await run_all_in_pool(self.pool, decode_crop, [
                    (plan.decoders[model], data, plan.max_pixels, arena, slots[i] if slots else 0)
                    for i, (_, data) in enumerate(payloads)])
        except ApiError as exc:
            error = exc
        except Exception as exc:  # the engine answers it as a 500, counted like any other
            log.exception("decoding a request failed")
            error = internal(f"{type(exc).__name__}: {exc}")
        started_header = (FRONTEND_STARTED.encode(), repr(started).encode())  # the deadline runs from here
        raw_target = b"/v1/classify?" + scope["query_string"]
        if error is None and model is None:  # not decodable here: the engine decodes
            return await self._engine("POST", raw_target, [*headers, started_header], body)
        internal_headers = [started_header, (FRONTEND_IMAGES.encode(), str(n_images).encode())]
        if error is not None:
            internal_headers.append((FRONTEND_ERROR.encode(), error.to_json()))
            crops, model, multipart = [], model or "", False
        elif slots is not None:
            assert self.arena is not None
            at = " ".join([self.arena.path, *(str(slot * self.arena.slot_bytes) for slot in slots)])
            internal_headers.append((FRONTEND_CROPS_AT.encode(), at.encode()))
        internal_headers += [(FRONTEND_MODEL.encode(), model.encode()),
                             (FRONTEND_MULTIPART.encode(), b"1" if multipart else b"0")]
        kept = [(k, v) for k, v in headers if k != b"content-type"]
        try:
            response = await self._decoded(query, kept + internal_headers, b"".join(crops))
        finally:
            if slots is not None:  # the engine has answered: it has copied the crops into a batch (or given up)
                self.arena.give_back(slots)
        if response[0] == 409 and json.loads(response[2]).get("error") == "reroute":
            # The route's model is not the one decoded for (an experiment this front-end did not know yet).
            log.info("a request re-sent undecoded: %s", json.loads(response[2])["detail"])
            await self._current_plan(refresh=True)
            return await self._engine("POST", raw_target, [*headers, started_header], body)
        return response

    async def _current_plan(self, refresh: bool = False) -> Plan:
        plan, now = self.plan, time.monotonic()
        stale = plan is None or now - plan.fetched_at > (PLAN_MAX_AGE_S if plan.ready else LOADING_RECHECK_S)
        if refresh or stale:
            async with self._plan_lock:
                if self.plan is plan:  # nobody fetched it meanwhile
                    assert self.engine is not None
                    answer = await self.engine.get("/internal/plan")
                    answer.raise_for_status()
                    self.plan = Plan.from_json(answer.json(), time.monotonic())
                    if self.plan.ready and self.arena is None and self.crops_dir and self.plan.decoders:
                        self.arena = self._arena(self.plan)
        assert self.plan is not None
        return self.plan

    def _arena(self, plan: Plan) -> CropArena | None:
        slot_bytes = max(3 * crop_h * crop_w for _, (_, rc) in plan.decoders.items() for crop_h, crop_w in [rc.crop])
        slots = self.arena_slots or max(ARENA_MIN_SLOTS, 4 * plan.max_images)
        try:
            return CropArena(self.crops_dir, slot_bytes, slots)
        except OSError as exc:
            log.warning("no shared memory for crops (%s: %d MiB in %s): crops go in the messages", exc,
                        slot_bytes * slots >> 20, self.crops_dir)
            self.crops_dir = None  # tried once
            return None

    async def _lifespan(self, receive: Callable, send: Callable) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.engine = httpx.AsyncClient(
                    transport=httpx.AsyncHTTPTransport(uds=self.engine_socket), base_url="http://engine",
                    timeout=None,  # the engine answers every request by its deadline
                    limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
                self.engine.headers.clear()  # no user-agent or accept of httpx's own: the client's, or none
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.engine is not None:
                    await self.engine.aclose()
                await self.channel.close()
                self.pool.shutdown(wait=True)
                if self.arena is not None:
                    self.arena.close()
                await send({"type": "lifespan.shutdown.complete"})
                return


def header(headers: list[tuple[bytes, bytes]], name: bytes) -> str:
    return next((v.decode("latin-1") for k, v in headers if k == name), "")


async def respond_error(send: Callable, error: ApiError, request_id: str) -> None:
    """An error the front-end answers itself, as the engine's errors look (docs/CONTRACT.md)."""
    body = error.to_answer(request_id)
    headers = [(b"content-type", b"application/json"), (b"x-request-id", request_id.encode()),
               *((name.lower().encode(), value.encode()) for name, value in error.headers.items())]
    await respond(send, error.status, headers, body)


async def respond(send: Callable, status: int, headers: list[tuple[bytes, bytes]], body: bytes,
                  content_length: int | None = None) -> None:
    length = len(body) if content_length is None else content_length
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(length).encode())]})
    await send({"type": "http.response.body", "body": body})


# ---- the processes


class FrontEndProcesses:
    """The engine's side: starts `count` front-end processes listening on the port `reserved` holds, replaces
    one that dies, and stops them (each drains: it answers what it accepted) before the engine stops."""

    def __init__(self, count: int, reserved: socket.socket, engine_socket: str, channel_socket: str, threads: int,
                 log_level: str, graceful_s: float, crops_dir: str | None, arena_slots: int | None = None,
                 on_fatal: Callable[[BaseException], None] | None = None, request_timeout_s: float = 30.0):
        self.on_fatal = on_fatal or (lambda exc: None)
        self._quick_deaths = 0
        self.channel_socket = channel_socket
        self.crops_dir = crops_dir
        self.arena_slots = arena_slots
        self.count = count
        self.reserved = reserved
        self.host, self.port = reserved.getsockname()[:2]
        self.engine_socket = engine_socket
        self.threads = threads
        self.log_level = log_level
        self.graceful_s = graceful_s
        self.request_timeout_s = request_timeout_s
        self.processes: list[subprocess.Popen] = []
        self._stopping = threading.Event()
        self._stopped = False
        self._lock = threading.Lock()
        self._monitor = threading.Thread(target=self._watch, name="frontend-monitor", daemon=True)

    def start(self) -> None:
        with self._lock:
            self.processes = [self._spawn() for _ in range(self.count)]
            self._started = [time.monotonic()] * self.count
        self._monitor.start()
        log.info("%d HTTP front-end process(es) on %s port %d, %d decoding threads each", self.count, self.host,
                 self.port, self.threads)

    def _spawn(self) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "server.frontend", "--host", self.host, "--port", str(self.port),
             "--engine-socket", self.engine_socket,
             "--channel-socket", self.channel_socket,
             "--threads", str(self.threads), "--log-level", self.log_level, "--graceful-s", str(self.graceful_s),
             "--request-timeout-s", str(self.request_timeout_s),
             *(["--crops-dir", self.crops_dir] if self.crops_dir else []),
             *(["--arena-slots", str(self.arena_slots)] if self.arena_slots is not None else [])],
            cwd=Path(__file__).resolve().parent.parent)  # `server` imports from the checkout too

    def _watch(self) -> None:
        while not self._stopping.wait(0.5):
            try:
                with self._lock:
                    for i, process in enumerate(self.processes):
                        if process.poll() is not None and not self._stopping.is_set():
                            self._replace(i, process)
            except Exception:  # a failed replacement is retried on the next round
                log.exception("replacing a front-end process failed")

    def _replace(self, i: int, process: subprocess.Popen) -> None:
        for leftover in Path(self.crops_dir or ".").glob(f"crops-{process.pid}-*"):
            leftover.unlink(missing_ok=True)  # its crop arena (the engine lets go of its mapping)
        # One that dies within seconds of starting will again (a port it cannot bind, a broken install):
        # after a few in a row the server stops, for its supervisor to see, rather than serve without them.
        self._quick_deaths = self._quick_deaths + 1 if time.monotonic() - self._started[i] < QUICK_DEATH_S else 0
        if self._quick_deaths >= QUICK_DEATHS_FATAL:
            log.error("front-end process %d exited with %s; not replaced: stopping the server", process.pid,
                      process.returncode)
            self._stopping.set()
            self.on_fatal(RuntimeError(f"{self._quick_deaths} front-end processes in a row exited within "
                                       f"{QUICK_DEATH_S:g} s of starting (the last with {process.returncode})"))
            return
        log.error("front-end process %d exited with %s; starting another", process.pid, process.returncode)
        self.processes[i] = self._spawn()
        self._started[i] = time.monotonic()

    def stop(self) -> None:
        """Stop accepting (each front-end closes its listening socket), let each answer what it accepted,
        then return. Idempotent."""
        with self._lock:
            # Its own flag: _stopping (no more replacements) is also set by the "keep dying" path, after
            # which the surviving front-ends must still be stopped and drained here.
            if self._stopped:
                return
            self._stopped = True
            self._stopping.set()
            self.reserved.close()
            for process in self.processes:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.graceful_s + 5
        for process in self.processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("front-end process %d did not stop in time: killed", process.pid)
                process.kill()
                process.wait()


def port_socket(host: str, port: int, listen: bool, shared: bool = True) -> socket.socket:
    """A socket on the public address with SO_REUSEPORT. The server process binds one and does not listen:
    it holds the port (a port in use fails at start, port 0 picks one); each front-end binds and listens on
    its own, and the kernel spreads new connections over them by address hash. (One shared listening socket
    let a front-end take connections in bursts: 8 keep-alive clients all landed on one of 2 front-ends.)
    `shared=False`: the one-process layout's socket, without SO_REUSEPORT (nothing else may listen there);
    uvicorn listens on it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if shared and not listen:  # first as any server binds: fails if something listens there already
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
            port = probe.getsockname()[1]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart despite TIME_WAIT
        if shared:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        if listen:
            sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="one HTTP front-end process of mame-serve (started by it)")
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--engine-socket", required=True, help="the engine's Unix socket (HTTP)")
    parser.add_argument("--channel-socket", required=True, help="the engine's Unix socket for decoded requests")
    parser.add_argument("--threads", type=int, default=4, help="decoding threads")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--graceful-s", type=float, default=40.0)
    parser.add_argument("--request-timeout-s", type=float, default=30.0,
                        help="the serving config's limits.request_timeout_s: request heads and bodies arrive within it")
    parser.add_argument("--crops-dir", help="where to put the shared-memory file for crops (default: none)")
    parser.add_argument("--arena-slots", type=int, help="crops in shared memory (default: from the limits)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format=f"%(asctime)s %(levelname)s %(name)s[{os.getpid()}]: "
                        "%(message)s")
    # httpx logs each request at INFO: every probe and scrape passed to the engine would be a line.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))
    sock = port_socket(args.host, args.port, listen=True)
    server = uvicorn.Server(uvicorn.Config(
        FrontEnd(args.engine_socket, args.channel_socket, args.threads, args.crops_dir, args.arena_slots,
                 args.request_timeout_s),
        log_level=args.log_level, lifespan="on", http=head_timeout_protocol(args.request_timeout_s),
        timeout_graceful_shutdown=int(args.graceful_s), access_log=args.log_level == "debug"))
    orphaned = threading.Event()
    threading.Thread(target=stop_when_orphaned, args=(server, orphaned), name="parent-watch", daemon=True).start()
    server.run(sockets=[sock])
    if orphaned.is_set() and args.crops_dir:  # the server process could not clean up its directory
        shutil.rmtree(args.crops_dir, ignore_errors=True)


def stop_when_orphaned(server: uvicorn.Server, orphaned: threading.Event, interval_s: float = 0.5) -> None:
    """Stop when the server process is gone (killed: it could not stop us): otherwise this process would
    keep the port and answer 503 forever."""
    parent = os.getppid()
    while os.getppid() == parent:
        time.sleep(interval_s)
    log.error("the server process %d is gone: stopping", parent)
    orphaned.set()
    server.should_exit = True


if __name__ == "__main__":
    main()
