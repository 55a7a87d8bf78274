"""server/wire: the pieces both faces of the server speak, torch-free."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic_core import from_json
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from server.wire.channel import Channel, FrameReader, answered_by_tasks, frame, serve
from server.wire.head_timeout import HeadTimeoutProtocol, head_timeout_protocol
from server.wire.protocol import request_id_of, without_reserved
from server.wire.results import (
    ImageResult,
    RouteNames,
    final_tokens,
    image_answer,
    render_results,
    results_message,
)

REPO = Path(__file__).resolve().parent.parent


def test_the_head_timeout_protocol_overrides_methods_uvicorn_still_has():
    """It subclasses a class uvicorn does not publish (pyproject pins uvicorn's minor version): a method it
    overrides that uvicorn renamed would silently stop being called."""
    overridden = {name for name, value in vars(HeadTimeoutProtocol).items()
                  if callable(value) and not name.startswith("_")}
    assert overridden == {"connection_made", "data_received", "send_400_response", "on_message_begin",
                          "on_headers_complete", "connection_lost", "shutdown"}
    assert all(callable(getattr(HttpToolsProtocol, name, None)) for name in overridden)
    assert head_timeout_protocol(2.5).timeout_s == 2.5 and issubclass(
        head_timeout_protocol(1), HttpToolsProtocol
    )


def test_request_ids_and_reserved_headers():
    assert request_id_of([(b"x-request-id", b"client-1.a_b")]) == "client-1.a_b"
    made = request_id_of([(b"x-request-id", b"not valid!")])
    assert len(made) == 32 and int(made, 16) >= 0
    assert without_reserved([(b"x-mame-client", b"1.2.3.4"), (b"accept", b"*/*")]) == [(b"accept", b"*/*")]


def test_wire_and_front_ends_import_no_torch():
    code = (
        "import sys, server.wire.body, server.wire.channel, server.wire.head_timeout, "
        "server.frontend.__main__; sys.exit('torch' in sys.modules or 'timm' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, check=False).returncode == 0


def test_frames_split_or_run_together_are_read_whole():
    """A read may bring part of a frame or several frames: each comes out whole, in order, once."""
    sent = [({"id": n, "query": "top_k=3"}, bytes([n]) * n) for n in range(5)]
    big = ({"id": 99}, bytes(range(256)) * 4096)  # 1 MiB: more than one read
    stream = b"".join(frame(head, body) for head, body in [*sent, big])

    async def read_all() -> list:
        reader = asyncio.StreamReader(limit=1 << 20)
        frames = FrameReader(reader)
        got = []
        reader.feed_data(stream[:5])  # not even a whole frame header
        reader.feed_data(stream[5:40])
        got += await frames.frames()
        reader.feed_data(stream[40:])
        while len(got) < len(sent) + 1:
            got += await frames.frames()
        reader.feed_data(frame({"id": 7})[:3])
        reader.feed_eof()
        with pytest.raises(asyncio.IncompleteReadError):
            await frames.frames()
        return got

    assert asyncio.run(read_all()) == [*sent, big]


def test_a_channel_answers_each_call_with_its_own_answer(tmp_path):
    """Many calls in flight on one connection, small and large, answered out of order: each caller gets its
    own answer."""
    async def run() -> None:
        async def handler(head: dict, body: bytes) -> tuple[dict, bytes]:
            await asyncio.sleep(0.001 * (head["n"] % 3))  # answers leave out of order
            return {"status": 200, "n": head["n"]}, body[::-1]

        path = str(tmp_path / "channel.sock")
        server = await serve(path, answered_by_tasks(handler))
        channel = Channel(path)
        bodies = [bytes([n % 256]) * (n * 997 if n % 10 else 1 << 19) for n in range(40)]
        answers = await asyncio.gather(*(channel.call({"n": n}, body) for n, body in enumerate(bodies)))
        assert [(head["n"], body) for head, body in answers] == [(n, b[::-1]) for n, b in enumerate(bodies)]
        await channel.close()
        server.close()

    asyncio.run(run())


def test_a_front_end_renders_results_into_the_answer_the_engine_would_write():
    """results_message -> render_results gives image_answer's JSON: one image as its answer, several as
    {request_id, results}; labels it has not (random weights) as class_<i>."""
    route = RouteNames("tiny", "mame-0.9", "ab", "assigned")
    results = [ImageResult([3, 1, 0], [0.5, 0.25, 0.125], [197, 150, 120], 197, 17.5, 0.004, 0.011, 3, "cpu"),
               ImageResult([2, 0, 1], [0.75, 0.2, 0.05], [], 197, 17.6, 0.004, 0.011, 3, "cpu")]
    labels = ["cat", "dog", "owl"]
    answers = {"tiny": ("random", labels)}
    one = render_results(results_message(route, "r1", results[:1], 0.02, 2, False), answers)
    assert from_json(one) == image_answer(route, "random", labels, "r1", results[0], 0.02, 2)
    assert [p["label"] for p in from_json(one)["predictions"]] == ["class_3", "dog"]
    several = from_json(render_results(results_message(route, "r2", results, 0.02, 3, True), answers))
    assert several == {"request_id": "r2",
                       "results": [image_answer(route, "random", labels, "r2", r, 0.02, 3) for r in results]}
    assert several["results"][1]["tokens"]["final"] == final_tokens(results[1]) == 197  # no blocks: the input
