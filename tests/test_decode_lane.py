"""The large-image lane: its threads run at a lower CPU priority (a higher nice value), alone in their
process; and Pillow allocates large images in blocks that glibc maps afresh (not zeroed with the GIL held)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from PIL import Image
from serverproc import tiny_config

from server.config import parse_config
from server.decode.imaging import LARGE_BLOCK_BYTES
from server.decode.lane import MAX_NICE, large_image_pool
from server.engine.metrics import Metrics
from server.engine.service import InferenceService
from server.frontend.app import FrontEnd
from server.http.app import build_engine

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")


def nice_of_this_thread() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@pytest.mark.parametrize("nice", [0, 3, 10, MAX_NICE + 5])
def test_the_lanes_threads_run_niced_and_the_other_threads_do_not(nice):
    base = nice_of_this_thread()
    started: list[int] = []
    pool = large_image_pool(2, nice, initializer=lambda: started.append(threading.get_native_id()))
    try:
        barrier = threading.Barrier(2)  # both threads of the lane, each asked once

        def nice_of_a_lane_thread() -> int:
            barrier.wait(5)
            return nice_of_this_thread()

        niced = [pool.submit(nice_of_a_lane_thread) for _ in range(2)]
        assert [f.result(10) for f in niced] == [min(MAX_NICE, base + nice)] * 2
    finally:
        pool.shutdown(wait=True)
    assert len(set(started)) == 2  # the initializer given ran in each thread too
    assert nice_of_this_thread() == base


def test_the_engines_and_a_front_ends_lanes_run_at_the_configured_nice_value():
    base = nice_of_this_thread()
    config = parse_config(tiny_config(limits={"large_image_nice": 4}))
    assert parse_config(tiny_config()).limits.large_image_nice == 10  # the default
    engine = build_engine(config, InferenceService(config, Metrics(), warmup=False, torch_threads=1),
                          preprocess_threads=1)
    front = FrontEnd("/nonexistent/engine.sock", "/nonexistent/channel.sock", threads=1, large_image_nice=4)
    try:
        for lane in (engine.large_pool, front.large_pool):
            assert lane.submit(nice_of_this_thread).result(10) == min(MAX_NICE, base + 4)
        for pool in (engine.pool, front.pool):  # small images: the process's priority
            assert pool.submit(nice_of_this_thread).result(10) == base
    finally:
        for pool in (engine.pool, engine.large_pool, front.pool, front.large_pool):
            pool.shutdown(wait=True)


def test_pillow_allocates_large_images_in_blocks_glibc_maps_afresh():
    # glibc's largest mmap threshold is 32 MiB; an image within the default pixel limit (40 Mpx, 4 bytes each
    # at most) fits one block.
    assert Image.core.get_block_size() == LARGE_BLOCK_BYTES
    assert LARGE_BLOCK_BYTES > 32 << 20 and LARGE_BLOCK_BYTES >= 4 * 40_000_000


def test_pillow_block_size_set_by_the_operator_wins():
    script = "import server.decode.imaging; from PIL import Image; print(Image.core.get_block_size())"
    env = {**os.environ, "PILLOW_BLOCK_SIZE": "8m",
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    printed = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                             check=True, timeout=60).stdout
    assert int(printed) == 8 << 20
