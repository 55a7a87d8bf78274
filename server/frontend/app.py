"""The front-end ASGI app (`mame-serve --layout frontends`): HTTP and decoding spread over N processes.

Why: one server process tops out at a few thousand images per second however many cores it has, because
its event loop, its decoding and its batch plumbing share one interpreter. With front-ends, the server
process (the "engine") keeps what must be one: the scheduler and the device workers (one copy of the
weights per device), the A/B registry, the metrics. It listens on private Unix sockets. N front-end
processes listen on the public port (SO_REUSEPORT) and, for `POST /v1/classify`, read the body, split
multipart, decode and crop each image (PIL, in threads of their own), then send the uint8 crops (in shared
memory) with the request's query and headers over a framed channel (server/wire/channel.py) to the engine,
whose classify() answers it with the results, which the front-end renders as the JSON answer
(server/wire/results.py).
The engine routes, batches, answers and counts exactly as for a request it decoded itself, so answers,
errors, A/B assignment and metrics are the same; its cost per image is a memory copy. Every other request is
passed to the engine as it came.

A request the front-end cannot decode for (an unknown model or experiment, a model whose timm transform is
not the usual resize + centre crop, the engine still loading) goes to the engine undecoded. An error the
front-end meets (body too large, not an image, undecodable) is sent to the engine to answer and count,
after the checks that come first (readiness, parameters, routing). This module imports no torch: a
front-end process is small.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import parse_qsl

import httpx
from starlette.datastructures import URL

from server.decode.budget import PixelBudget
from server.decode.crops import Decoder, decoder_from_list
from server.decode.imaging import open_all
from server.decode.lane import decode_in_lanes, large_image_pool
from server.frontend.arena import ARENA_MIN_SLOTS, CropArena, decode_crop
from server.wire.admin import ADMIN_MAX_BODY_BYTES, admin_token_from_env, check_admin
from server.wire.body import image_payloads, read_limited
from server.wire.channel import Channel, ChannelError
from server.wire.errors import ApiError, error_body, internal, not_ready, oip_status, timeout
from server.wire.protocol import (
    FRONTEND_ADMIT,
    FRONTEND_CLIENT,
    FRONTEND_CROPS_AT,
    FRONTEND_DECODING_ERROR,
    FRONTEND_ERROR,
    FRONTEND_IMAGES,
    FRONTEND_MODEL,
    FRONTEND_MULTIPART,
    FRONTEND_RESERVATION,
    FRONTEND_STARTED,
    request_head,
    request_id_of,
    without_reserved,
)
from server.wire.results import render_results

log = logging.getLogger("mame.frontend")
Answer = tuple[int, list[tuple[bytes, bytes]], bytes]  # status, headers, body

# Not passed on between a client and the engine: connection-level headers, the length (recomputed), the
# request id (set by the front-end), and the engine's server and date (the front-end's uvicorn adds its own).
_NOT_FORWARDED = {b"connection", b"keep-alive", b"transfer-encoding", b"te", b"trailer", b"upgrade",
                  b"proxy-connection", b"content-length", b"x-request-id", b"date", b"server"}
PASS_THROUGH_MAX_BYTES = ADMIN_MAX_BODY_BYTES  # other passed-on bodies than classify, /v2 infer (admin JSON)
ADMIT_FIRST_S = 1.0  # after an `overloaded` answer: requests ask for admission before decoding, this long
PLAN_MAX_AGE_S = 5.0  # how stale the engine's experiments may be here (a stale one costs a re-send, no error)
LOADING_RECHECK_S = 0.5
PROBES = ("/healthz", "/readyz")


@dataclass(frozen=True)
class Plan:
    """What a front-end knows of the engine: limits, model choice, and how to decode for each model."""

    ready: bool
    max_body_bytes: int
    max_pixels: int
    max_request_pixels: int
    max_decoding_pixels: int
    max_images: int
    default_model: str
    experiment_models: dict[str, str]  # running experiments
    decoders: dict[str, Decoder]
    answers: dict[str, tuple[str, list[str]]]  # each model's weights and labels, for its answers
    fetched_at: float

    @classmethod
    def from_json(cls, data: dict, fetched_at: float) -> Plan:
        decoders = {name: decoder_from_list(values) for name, values in data["decoders"].items() if values}
        limits = data["limits"]
        return cls(
            data["ready"],
            limits["max_body_bytes"],
            limits["max_pixels"],
            limits["max_request_pixels"],
            limits["max_decoding_pixels"],
            limits["max_images_per_request"],
            data["default_model"],
            data["experiment_models"],
            decoders,
            {name: (weights, labels) for name, (weights, labels) in data["answers"].items()},
            fetched_at,
        )

    def model_for(self, params: dict[str, str]) -> str | None:
        """The model the engine will route a request to (ExperimentRegistry.choose), if decodable here."""
        experiment = params.get("experiment")
        if experiment is not None:
            model = self.experiment_models.get(experiment)
        else:
            model = params.get("model", self.default_model)
        return model if model in self.decoders else None


class FrontEnd:
    """The ASGI application of one front-end process."""

    def __init__(self, engine_socket: str, channel_socket: str, threads: int, crops_dir: str | None = None,
                 arena_slots: int | None = None, request_timeout_s: float = 30.0,
                 health_timeout_s: float = 2.0, large_image_nice: int = 10):
        self.engine_socket = engine_socket
        self.request_timeout_s = request_timeout_s  # the serving config's: heads and bodies arrive within it
        self.health_timeout_s = health_timeout_s  # the serving config's health.engine_timeout_s
        self.channel = Channel(channel_socket)
        self.crops_dir = crops_dir if arena_slots != 0 else None
        self.arena_slots = arena_slots
        self.arena: CropArena | None = None
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="decode")
        # Images of LARGE_IMAGE_PIXELS or more in a lane of one thread, at a lower CPU priority (the serving
        # config's limits.large_image_nice): small ones never wait behind them for a thread, and get the
        # cores first.
        self.large_pool = large_image_pool(1, large_image_nice)
        self.pixels: PixelBudget | None = None  # pixels decoded at once here (the plan's limit)
        self.plan: Plan | None = None
        self._plan_lock = asyncio.Lock()
        self._admit_first_until = 0.0  # time.monotonic(): until then, admission before decoding (overload)
        self.engine: httpx.AsyncClient | None = None
        # the engine's: it started this process (read at start, as there)
        self.admin_token = admin_token_from_env()

    async def _decode(self, calls: list[tuple], deadline: float, which: str) -> list[bytes]:
        """decode_crop(*call) for each call, within the pixels decoded at once and the deadline, large
        images in their own lane; past the deadline, 504 saying that `which` (e.g. "its image was") still
        being decoded."""
        assert self.pixels is not None
        try:
            return await decode_in_lanes(decode_crop, calls, self.pixels, self.pool, self.large_pool,
                                         deadline - time.monotonic())
        except TimeoutError:
            raise timeout(f"no answer within the request timeout of {self.request_timeout_s:g} s "
                          f"({which} still being decoded)") from None

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
        # The host the engine builds its URLs from (a trailing-slash redirect): the client's when valid, else
        # the
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
            elif scope["method"] == "POST" and scope["path"] == "/v1/explain":
                status, answer_headers, body = await self._explain(scope, receive, headers, target)
            else:
                body = await self._pass_through_body(scope, receive)
                ask = self._probe if scope["path"] in PROBES else self._engine
                status, answer_headers, body = await ask(scope["method"], target, headers, body)
        # a request h11 will not send (the engine is fine): the client's fault
        except httpx.LocalProtocolError as exc:
            await respond_error(send, ApiError(400, "http_error", f"the request cannot be passed on: {exc}"),
                                request_id)
            return
        except (httpx.TransportError, ChannelError) as exc:
            log.warning("the engine is not reachable: %s", exc)
            await respond_error(
                send, not_ready(f"the inference engine is not reachable ({type(exc).__name__})"), request_id
            )
            return
        except ApiError as exc:
            await respond_error(send, exc, request_id, oip=scope["path"].startswith("/v2/"))
            return
        # a bug (or a plan the engine could not give): the contract's 500, not uvicorn's text
        except Exception:
            log.exception("request %s failed in the front-end", request_id)
            await respond_error(
                send,
                internal(f"unexpected front-end error; the server log has request {request_id}"),
                request_id,
            )
            return
        # HEAD: the engine's content-length, that of the GET (the body is not sent)
        length = next((int(v) for k, v in answer_headers if k.lower() == b"content-length"), 0) \
            if scope["method"] == "HEAD" else None
        forwarded = [(k, v) for k, v in answer_headers if k.lower() not in _NOT_FORWARDED]
        if any(k.lower() == b"connection" and b"close" in v.lower() for k, v in answer_headers):
            forwarded.append((b"connection", b"close"))  # a body left unread: uvicorn closes after the answer
        await respond(send, status, [*forwarded, (b"x-request-id", request_id.encode())], body, length)

    async def _pass_through_body(self, scope: dict, receive: Callable) -> bytes:
        """The body of a request passed on as it came, at most PASS_THROUGH_MAX_BYTES.

        An admin request over it is refused for its token first, as the engine would (the token before the
        body, docs/ab_testing.md). Checked here, with the token the engine has: this process inherits its
        environment. Not by asking the engine with an empty body: a DELETE or GET with the right token would
        then run."""
        limit = PASS_THROUGH_MAX_BYTES
        if scope["method"] == "POST" and scope["path"].startswith("/v2/"):  # infer: images, as classify's
            limit = max(limit, (await self._current_plan()).max_body_bytes)
        try:
            return await read_limited(
                receive,
                header(scope["headers"], b"content-length"),
                limit,
                self.request_timeout_s,
            )
        except ApiError as exc:
            if exc.status == 413 and scope["path"].startswith("/v1/admin/"):
                denied = check_admin(header(scope["headers"], b"authorization"), self.admin_token)
                if denied is not None:
                    raise denied.as_api_error() from None
            raise

    async def _probe(self, method: str, target: bytes, headers: list, body: bytes) -> Answer:
        """/healthz and /readyz, asked of the engine within `health_timeout_s`: an engine whose event loop is
        wedged answers nothing, and a probe then fails here rather than waiting for ever."""
        try:
            async with asyncio.timeout(self.health_timeout_s):
                return await self._engine(method, target, headers, body)
        except TimeoutError:
            body = json.dumps({"status": "unresponsive", "detail": "the inference engine did not answer "
                               f"within {self.health_timeout_s:g} s"}).encode()
            return 503, [(b"content-type", b"application/json")], body

    async def _engine(self, method: str, target: bytes, headers: list, body: bytes) -> Answer:
        """A request passed to the engine's HTTP socket as it came (the target unparsed: httpx would drop
        `.` and `..` segments, and the engine must route what the client sent)."""
        assert self.engine is not None
        request = self.engine.build_request(method, "/", headers=headers, content=body,
                                            extensions={"target": target})
        response = await self.engine.send(request)
        return response.status_code, response.headers.raw, response.content

    async def _decoded(self, query: str, headers: list, body: bytes, path: str | None = None) -> Answer:
        """A request whose images this front-end decoded, over the channel to the engine's classify() (or,
        with `path` /v1/explain, its explain())."""
        head = request_head(query, headers)
        head, answer = await self.channel.call(head | ({"path": path} if path else {}), body)
        if head.get("results"):  # a classification's results: the answer is rendered here
            assert self.plan is not None  # the model's crops were made with it
            answer = render_results(answer, self.plan.answers)
        return (
            head["status"],
            [(k.encode("latin-1"), v.encode("latin-1")) for k, v in head["headers"]],
            answer,
        )

    async def _classify(self, scope: dict, receive: Callable, headers: list) -> Answer:
        started = time.monotonic()
        deadline = started + self.request_timeout_s
        query = scope["query_string"].decode("latin-1")
        plan = await self._current_plan()
        model = plan.model_for(dict(parse_qsl(query, keep_blank_values=True)))
        body, error, n_images, slots, crops, reservation = b"", None, 0, None, [], None
        admit_first, decoding = started < self._admit_first_until, False
        started_header = (FRONTEND_STARTED.encode(), repr(started).encode())  # the deadline runs from here
        raw_target = b"/v1/classify?" + scope["query_string"]
        kept = [(k, v) for k, v in headers if k != b"content-type"]
        try:
            body = await read_limited(
                receive,
                header(scope["headers"], b"content-length"),
                plan.max_body_bytes,
                max(0.0, deadline - time.monotonic()),
            )
            payloads, multipart = image_payloads(header(headers, b"content-type"), body, plan.max_images)
            n_images = len(payloads)
            if model is not None:
                # Admission before work: the headers (pixel limits) here; the engine's queue before decoding
                # while it refuses requests, else with the decoded request (one message, not two).
                opened = open_all([data for _, data in payloads], plan.max_pixels, plan.max_request_pixels,
                                  plan.decoders[model][0])
                if admit_first:  # the engine refused requests lately: no decoding for a refusal
                    asking = _internal((FRONTEND_ADMIT, "1"), (FRONTEND_IMAGES, str(n_images)),
                                       (FRONTEND_MODEL, model))
                    admitted = await self._decoded(query, [*kept, started_header, *asking], b"")
                    # refused (counted there), or routed to another model (409 reroute)
                    if admitted[0] != 202:
                        self._note_overload(admitted)
                        return await self._reroute_or(admitted, raw_target, headers, started_header, body)
                    reservation = json.loads(admitted[2])["reservation"]
                decoding = not admit_first  # an error from here on comes after admission
                slots = self.arena.take(len(payloads)) if self.arena is not None else None
                arena = self.arena if slots is not None else None
                crops = await self._decode([
                    (plan.decoders[model], image, 0, arena, slots[i] if slots else 0)
                    for i, image in enumerate(opened)], deadline, "its images were")
        except ApiError as exc:
            error = exc
        except Exception as exc:  # the engine answers it as a 500, counted like any other
            log.exception("decoding a request failed")
            error = internal(f"{type(exc).__name__}: {exc}")
        if error is None and model is None:  # not decodable here: the engine decodes
            return await self._engine("POST", raw_target, [*headers, started_header], body)
        internal_headers = [started_header, (FRONTEND_IMAGES.encode(), str(n_images).encode())]
        if reservation is not None:
            internal_headers.append((FRONTEND_RESERVATION.encode(), reservation.encode()))
        if error is not None:
            internal_headers.append((FRONTEND_ERROR.encode(), error.to_json()))
            if decoding:
                internal_headers.append((FRONTEND_DECODING_ERROR.encode(), b"1"))
            crops, model, multipart = [], model or "", False
        elif slots is not None:
            assert self.arena is not None
            at = " ".join([self.arena.path, *(str(slot * self.arena.slot_bytes) for slot in slots)])
            internal_headers.append((FRONTEND_CROPS_AT.encode(), at.encode()))
        internal_headers += [(FRONTEND_MODEL.encode(), model.encode()),
                             (FRONTEND_MULTIPART.encode(), b"1" if multipart else b"0")]
        try:
            response = await self._decoded(query, kept + internal_headers, b"".join(crops))
        finally:
            # the engine has answered: it has copied the crops into a batch (or given up)
            if slots is not None:
                self.arena.give_back(slots)
        self._note_overload(response)
        return await self._reroute_or(response, raw_target, headers, started_header, body)

    def _note_overload(self, answer: Answer) -> None:
        """An `overloaded` answer: for ADMIT_FIRST_S, requests ask for admission before they are decoded,
        so that the front-end decodes nothing the engine refuses."""
        if answer[0] == 503 and json.loads(answer[2]).get("error") == "overloaded":
            self._admit_first_until = time.monotonic() + ADMIT_FIRST_S

    async def _explain(self, scope: dict, receive: Callable, headers: list, target: bytes) -> Answer:
        """`POST /v1/explain`: its one image decoded and cropped here, the crop sent over the channel in the
        message (one image, and one explanation at a time: no arena slot) for the engine to check, route,
        run and draw. An error met here goes with it, answered there after the checks that come first."""
        deadline = time.monotonic() + self.request_timeout_s
        started_header = (FRONTEND_STARTED.encode(), repr(deadline - self.request_timeout_s).encode())
        query = scope["query_string"].decode("latin-1")
        plan = await self._current_plan()
        model = plan.model_for({k: v for k, v in parse_qsl(query) if k == "model"})  # no experiments
        body, crop, error = b"", b"", None
        try:
            body = await read_limited(receive, header(scope["headers"], b"content-length"),
                                      plan.max_body_bytes, self.request_timeout_s)
            if model is not None:
                payloads, _ = image_payloads(header(headers, b"content-type"), body, 1)
                (opened,) = open_all([payloads[0][1]], plan.max_pixels, plan.max_request_pixels,
                                     plan.decoders[model][0])
                (crop,) = await self._decode([(plan.decoders[model], opened, 0)], deadline, "its image was")
        except ApiError as exc:
            error = exc
        except Exception as exc:  # the engine answers it as a 500, counted like any other
            log.exception("decoding an explain request failed")
            error = internal(f"{type(exc).__name__}: {exc}")
        if error is None and model is None:  # not decodable here: the engine decodes
            return await self._engine("POST", target, [*headers, started_header], body)
        kept = [(k, v) for k, v in headers if k != b"content-type"]
        internal_headers = [started_header, *_internal((FRONTEND_IMAGES, "1"), (FRONTEND_MODEL, model or ""))]
        if error is not None:
            internal_headers.append((FRONTEND_ERROR.encode(), error.to_json()))
            crop = b""
        return await self._decoded(query, kept + internal_headers, crop, path="/v1/explain")

    async def _reroute_or(self, response: Answer, raw_target: bytes, headers: list, started_header: tuple,
                          body: bytes) -> Answer:
        """The engine's answer, unless it is a re-route: the route's model is not the one this front-end
        decoded (or was about to decode) for, an experiment it did not know yet; then the request goes to
        the engine undecoded."""
        if response[0] == 409 and json.loads(response[2]).get("error") == "reroute":
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
                    if self.pixels is None or self.pixels.limit != self.plan.max_decoding_pixels:
                        self.pixels = PixelBudget(self.plan.max_decoding_pixels)
                    if self.plan.ready and self.arena is None and self.crops_dir and self.plan.decoders:
                        self.arena = self._arena(self.plan)
        assert self.plan is not None
        return self.plan

    def _arena(self, plan: Plan) -> CropArena | None:
        slot_bytes = max(
            3 * crop_h * crop_w for _, (_, rc) in plan.decoders.items() for crop_h, crop_w in [rc.crop]
        )
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
                self.large_pool.shutdown(wait=True)
                if self.arena is not None:
                    self.arena.close()
                await send({"type": "lifespan.shutdown.complete"})
                return


def _internal(*pairs: tuple[str, str]) -> list[tuple[bytes, bytes]]:
    return [(name.encode(), value.encode()) for name, value in pairs]


def header(headers: list[tuple[bytes, bytes]], name: bytes) -> str:
    return next((v.decode("latin-1") for k, v in headers if k == name), "")


async def respond_error(send: Callable, error: ApiError, request_id: str, oip: bool = False) -> None:
    """An error the front-end answers itself, as the engine's errors look (docs/api.md); on /v2 paths in
    the Open Inference Protocol's body, as the engine answers there (docs/oip.md)."""
    body = error_body(error) if oip else error.to_answer(request_id)
    if oip:
        error = ApiError(oip_status(error), error.code, error.detail, error.headers)
    headers = [(b"content-type", b"application/json"), (b"x-request-id", request_id.encode()),
               *((name.lower().encode(), value.encode()) for name, value in error.headers.items())]
    await respond(send, error.status, headers, body)


async def respond(send: Callable, status: int, headers: list[tuple[bytes, bytes]], body: bytes,
                  content_length: int | None = None) -> None:
    length = len(body) if content_length is None else content_length
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(length).encode())]})
    await send({"type": "http.response.body", "body": body})
