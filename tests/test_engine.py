"""server/engine: the dynamic batcher, the device worker and the device process, with a real tiny ViT."""

from __future__ import annotations

import asyncio
import os
import tempfile
import threading
import time

import pytest
import torch
from serverproc import tiny_config

from mame_core import MergeSettings
from server.config import BatchingConfig, parse_config
from server.engine.batching import QueueFull, Scheduler, SchedulerClosed, WorkItem
from server.engine.devices import place_model
from server.engine.metrics import Metrics
from server.engine.models import load_model
from server.engine.worker import DeviceWorker, ImageResult, by_input_kind, infer, stack_batch
from server.wire.errors import ApiError

NONE = MergeSettings()
MAME = MergeSettings(method="mame", tau=0.5, blocks=3)


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def pixels(*shape: int) -> torch.Tensor:
    return torch.zeros(shape, dtype=torch.uint8)


def item(loop, variant: str = "a", image: torch.Tensor | None = None, deadline_s: float = 60.0,
         settings: MergeSettings = NONE, model: str = "m") -> WorkItem:
    return WorkItem(model, variant, settings, image if image is not None else pixels(3, 64, 64), 3,
                    time.monotonic() + deadline_s, loop.create_future(), loop)


def scheduler(max_batch_size=4, max_wait_ms=50.0, max_queue=10) -> Scheduler:
    return Scheduler({"m": BatchingConfig(max_batch_size=max_batch_size, max_wait_ms=max_wait_ms,
                                          max_queue=max_queue)})


def test_full_batch_is_taken_at_once_and_holds_one_variant(loop):
    s = scheduler(max_batch_size=3, max_wait_ms=10_000)
    s.submit([item(loop, "a") for _ in range(2)])
    s.submit([item(loop, "b") for _ in range(3)])
    started = time.monotonic()
    batch = s.next_batch({"m"})
    assert time.monotonic() - started < 1  # did not wait max_wait_ms: the b queue was full
    assert [i.variant for i in batch] == ["b", "b", "b"]


def test_partial_batch_waits_at_most_max_wait(loop):
    s = scheduler(max_batch_size=8, max_wait_ms=100)
    s.submit([item(loop)])
    started = time.monotonic()
    batch = s.next_batch({"m"})
    waited = time.monotonic() - started
    assert len(batch) == 1 and 0.05 < waited < 2


def test_oldest_head_goes_first_across_variants(loop):
    s = scheduler(max_batch_size=2, max_wait_ms=0)
    s.submit([item(loop, "a")])
    s.submit([item(loop, "b"), item(loop, "b")])
    s.submit([item(loop, "a")])
    assert [i.variant for i in s.next_batch({"m"})] == ["a", "a"]
    assert [i.variant for i in s.next_batch({"m"})] == ["b", "b"]


def test_bounded_queue_takes_all_of_a_request_or_none(loop):
    s = scheduler(max_queue=4)
    s.submit([item(loop) for _ in range(3)])
    with pytest.raises(QueueFull):
        s.submit([item(loop), item(loop)])
    assert s.pending("m") == 3 and s.depth("m", "a") == 3
    s.submit([item(loop)])
    assert s.depth("m", "a") == 4 and s.depth("m", "b") == 0


def test_discard_frees_the_queue(loop):
    s = scheduler(max_queue=2)
    items = [item(loop), item(loop)]
    s.submit(items)
    s.discard(items)
    assert s.pending("m") == 0
    s.submit([item(loop), item(loop)])


def test_the_queue_of_a_stalled_device_fails_with_the_given_error_and_frees_its_places(loop):
    s = scheduler(max_queue=4)
    items = [item(loop, "a"), item(loop, "b"), item(loop, "b")]
    s.submit(items[:1])
    s.submit(items[1:])
    stalled = ApiError(503, "device_stalled", "stalled")
    assert s.fail_queued({"m"}, stalled) == 3 and s.pending("m") == 0
    loop.run_until_complete(asyncio.sleep(0))  # the failures arrive through the loop
    assert all(i.future.exception() is stalled for i in items)
    assert s.depth("m", "a") == 0 and s.depth("m", "b") == 0
    s.submit([item(loop) for _ in range(4)])  # the places are free again


def test_close_drains_then_stops(loop):
    s = scheduler(max_batch_size=2, max_wait_ms=10_000)
    s.submit([item(loop) for _ in range(3)])
    s.close()
    with pytest.raises(SchedulerClosed):
        s.submit([item(loop)])
    assert len(s.next_batch({"m"})) == 2  # closing does not wait for batches to fill
    assert len(s.next_batch({"m"})) == 1
    assert s.next_batch({"m"}) is None


def test_worker_blocks_until_work_arrives(loop):
    s = scheduler(max_batch_size=1)
    got = []
    thread = threading.Thread(target=lambda: got.append(s.next_batch({"m"})))
    thread.start()
    time.sleep(0.2)
    assert not got
    s.submit([item(loop)])
    thread.join(5)
    assert len(got[0]) == 1


def test_a_waiting_worker_wakes_when_a_queue_starts_or_fills_not_for_every_image(loop):
    """Waking the worker for each single-image request cost the server process 8 % of its GIL time: a
    waiting worker is woken for a new head (its due time changes) or a full batch, and only then."""
    s = scheduler(max_batch_size=4, max_wait_ms=10_000)
    wakes = []
    notify_all = s._cond.notify_all
    s._cond.notify_all = lambda: (wakes.append(s.pending("m")), notify_all())  # counts the wake-ups
    got = []
    thread = threading.Thread(target=lambda: got.append(s.next_batch({"m"})))
    thread.start()
    for _ in range(4):
        time.sleep(0.05)
        s.submit([item(loop)])
    thread.join(5)  # the full batch is taken at once, not after max_wait_ms (10 s)
    assert len(got[0]) == 4
    assert wakes == [1, 4]  # the first image (a new head) and the fourth (a full batch)
# ------------------------------------------------------------------------------------ the device worker


@pytest.fixture(scope="module")
def tiny_model():
    loaded = load_model("m", parse_config(tiny_config()).models["tiny"])
    return place_model(
        "m",
        loaded.model,
        torch.device("cpu"),
        torch.float32,
        loaded.input_size,
        copy_weights=False,
        mean=loaded.transform.mean,
        std=loaded.transform.std,
    )


def run_worker(worker: DeviceWorker, loop, batches: list[list[WorkItem]]) -> list:
    """Submit each list as one request, let the worker answer them all, return the outcomes in order."""
    for batch in batches:
        worker.scheduler.submit(batch)
    worker.scheduler.close()
    worker.start()
    worker.join(60)
    futures = [i.future for batch in batches for i in batch]

    async def outcomes():
        return await asyncio.gather(*futures, return_exceptions=True)

    return loop.run_until_complete(outcomes())


def images(n: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=gen) for _ in range(n)]


def test_a_failing_batch_fails_only_its_own_requests(loop, tiny_model):
    s = scheduler(max_batch_size=4, max_wait_ms=0)
    worker = DeviceWorker(torch.device("cpu"), {"m": tiny_model}, s, Metrics())
    good_before = [item(loop, "a", x) for x in images(2)]
    wrong_shape = [item(loop, "b", pixels(3, 64, 64)), item(loop, "b", pixels(3, 32, 32))]
    good_after = [item(loop, "c", x) for x in images(2, seed=1)]
    out = run_worker(worker, loop, [good_before, wrong_shape, good_after])
    assert all(isinstance(o, ImageResult) for o in out[:2] + out[4:])
    assert all(isinstance(o, ApiError) and o.status == 500 and o.code == "internal" for o in out[2:4])


def test_expired_items_are_not_run(loop, tiny_model):
    s = scheduler(max_batch_size=4, max_wait_ms=0)
    worker = DeviceWorker(torch.device("cpu"), {"m": tiny_model}, s, Metrics())
    expired = item(loop, deadline_s=-1)
    fresh = item(loop)
    out = run_worker(worker, loop, [[expired, fresh]])
    assert isinstance(out[0], ApiError) and out[0].status == 504
    assert isinstance(out[1], ImageResult) and out[1].batch_size == 1


class OutOfMemoryAbove2(DeviceWorker):
    """A device that runs out of memory on batches of more than 2 images (as a GPU would)."""

    def forward(self, dm, settings, x, top_k):
        if x.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return super().forward(dm, settings, x, top_k)


def test_out_of_memory_splits_the_batch_and_retries(loop, tiny_model):
    xs = images(5)
    s = scheduler(max_batch_size=8, max_wait_ms=0)
    worker = OutOfMemoryAbove2(torch.device("cpu"), {"m": tiny_model}, s, Metrics())
    out = run_worker(worker, loop, [[item(loop, "a", x, settings=MAME) for x in xs]])
    assert all(isinstance(o, ImageResult) for o in out), out
    assert sorted(o.batch_size for o in out) == [1, 2, 2, 2, 2]
    alone = DeviceWorker(torch.device("cpu"), {"m": tiny_model}, scheduler(), Metrics())
    for x, result in zip(xs, out):
        scores, indices, tokens, _, _ = alone.forward(tiny_model, MAME, x[None], top_k=3)
        assert result.indices == indices[0].tolist()
        assert result.tokens_per_block == tokens[0].tolist()
        assert result.scores == pytest.approx(scores[0].tolist(), abs=1e-5)


def test_normalising_on_the_device_equals_timms_own_eval_transform(tiny_model):
    """The host sends uint8 crops and the worker normalises: the same input as timm's ToTensor + Normalize."""
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    from mame_core.images import sample_images

    loaded = load_model("m", parse_config(tiny_config()).models["tiny"])
    timm_eval = create_transform(**resolve_data_config({"input_size": loaded.input_size}, model=loaded.model))
    pictures = [Image.open(path).convert("RGB") for path in sample_images()[:3]]
    x = stack_batch([loaded.transform(p) for p in pictures], pin=False)
    assert x.dtype == torch.uint8 and x.shape == (3, *loaded.input_size)
    scores, indices, _, _, _ = infer(tiny_model, NONE, x, top_k=5)
    with torch.inference_mode():
        reference = (
            tiny_model.vit(torch.stack([timm_eval(p) for p in pictures]), NONE).logits.softmax(-1).topk(5)
        )
    assert torch.equal(indices, reference.indices)
    assert torch.allclose(scores, reference.values, atol=1e-6)


def test_worker_input_is_uint8_crops_or_float32_normalised_images_of_one_shape(tiny_model):
    crop = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8, generator=torch.manual_seed(0))
    as_crop = infer(tiny_model, MAME, crop, top_k=3)
    # float32: a client's normalised pixels, taken as they are (not normalised again)
    as_float = infer(tiny_model, MAME, (crop.float() / 255 - tiny_model.mean) / tiny_model.std, top_k=3)
    assert as_float[1].tolist() == as_crop[1].tolist() and as_float[2].tolist() == as_crop[2].tolist()
    assert torch.allclose(as_float[0], as_crop[0], atol=1e-6)
    with pytest.raises(TypeError, match="uint8 crops or float32"):
        infer(tiny_model, NONE, torch.zeros(1, 3, 64, 64, dtype=torch.float64), top_k=1)
    with pytest.raises(RuntimeError):
        stack_batch([pixels(3, 64, 64), pixels(3, 32, 32)], pin=False)


def test_a_batch_of_crops_and_float_images_runs_as_one_batch_of_each(loop, tiny_model):
    """The queue takes uint8 crops and float32 images alike; each kind runs as a batch of its own, and
    every item gets its own image's answer."""
    scheduler = Scheduler({"m": BatchingConfig(max_batch_size=8, max_wait_ms=1, max_queue=64)})
    worker = DeviceWorker(torch.device("cpu"), {"m": tiny_model}, scheduler, Metrics(), torch_threads=1)
    crops = [torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8) for _ in range(3)]
    floats = [(c.float().unsqueeze(0) / 255 - tiny_model.mean).div(tiny_model.std)[0] for c in crops[:2]]
    items = [item(loop, image=image, settings=MAME) for image in [crops[0], floats[0], crops[1], floats[1],
                                                                   crops[2]]]
    assert [len(run) for run in by_input_kind(items)] == [3, 2]
    worker._run(items)
    results = loop.run_until_complete(asyncio.gather(*(i.future for i in items)))
    assert [r.batch_size for r in results] == [3, 2, 3, 2, 3]
    assert results[1].indices == results[0].indices and results[3].indices == results[2].indices


def test_split_on_oom_halves_until_batches_fit():
    from server.engine.worker import split_on_oom

    calls = []

    def run(start: int, stop: int) -> int:
        calls.append((start, stop))
        if stop - start > 3:
            raise torch.OutOfMemoryError("simulated")
        return stop - start

    assert split_on_oom(run, 0, 10) == [(0, 2, 2), (2, 5, 3), (5, 7, 2), (7, 10, 3)]
    assert calls[0] == (0, 10)

    def never_fits(start: int, stop: int) -> int:
        raise torch.OutOfMemoryError("simulated")

    with pytest.raises(torch.OutOfMemoryError):
        split_on_oom(never_fits, 0, 4)


# ------------------------------------------------------------------------------ the device process


def test_a_device_process_answers_like_the_in_process_worker(loop, tiny_model):
    """The same batches through a real child process (CPU): equal answers; a bad batch fails alone; expired
    items are not sent; the child stops when the queue is drained."""
    from server.engine.device_process import ProcessWorker, WarmUp

    cfg = parse_config(tiny_config()).models["tiny"]
    s = scheduler(max_batch_size=4, max_wait_ms=0)
    worker = ProcessWorker(torch.device("cpu"), {"m": cfg}, s, Metrics(), torch_threads=1)
    described = worker.launch(WarmUp({"m": [MAME]}))
    assert described["m"].input_size == (3, 64, 64) and described["m"].weights == "random-init"
    xs = images(6)
    good = [item(loop, "a", x, settings=MAME) for x in xs[:4]]
    wrong_shape = [item(loop, "b", pixels(3, 64, 64)), item(loop, "b", pixels(3, 32, 32))]
    expired = [item(loop, "c", xs[4], deadline_s=-1)]
    more = [item(loop, "d", xs[5], settings=MAME)]
    out = run_worker(worker, loop, [good, wrong_shape, expired, more])
    for x, result in zip(xs[:4] + xs[5:], out[:4] + out[7:]):
        assert isinstance(result, ImageResult), result
        # The child made its own copy of the weights: random initialisation is seeded, so they are the same.
        scores, indices, tokens, _, _ = infer(tiny_model, MAME, x[None], top_k=3)
        assert result.indices == indices[0].tolist() and result.tokens_per_block == tokens[0].tolist()
        assert result.scores == pytest.approx(scores[0].tolist(), abs=1e-5)
    assert out[0].batch_size == 4 and out[7].batch_size == 1
    assert all(isinstance(o, ApiError) and o.status == 500 for o in out[4:6])
    assert isinstance(out[6], ApiError) and out[6].status == 504
    assert worker._process.exitcode == 0  # stopped cleanly after the drain


def test_a_batch_being_copied_when_the_device_process_dies_fails_at_once(loop, monkeypatch):
    """The child dies while the feeder copies a batch (the receiver has already failed what was in flight):
    that batch was recorded afterwards and waited for its 504, and its slab was lost, so the drain at
    shutdown waited for ever. It fails at once, naming the exit status, and the feeder stops."""
    from server.engine import device_process

    cfg = parse_config(tiny_config()).models["tiny"]
    s = scheduler(max_batch_size=4, max_wait_ms=0)
    worker = device_process.ProcessWorker(torch.device("cpu"), {"m": cfg}, s, Metrics(), torch_threads=1)
    worker.launch(None)
    real_stack = device_process.stack_into

    def stack_while_the_child_dies(images, memory):
        worker._process.kill()
        worker._receiver.join(10)
        return real_stack(images, memory)

    monkeypatch.setattr(device_process, "stack_into", stack_while_the_child_dies)
    doomed = item(loop, "a")
    s.submit([doomed])
    s.close()
    worker.start()
    with pytest.raises(ApiError) as failed:  # before the fix: no answer (TimeoutError here)
        loop.run_until_complete(asyncio.wait_for(asyncio.shield(doomed.future), 20))
    assert failed.value.status == 500 and "died (exit code -9)" in failed.value.detail
    worker.join(20)
    assert not worker._feeder.is_alive()  # its slab came back: the drain at shutdown ends


def test_channels_last_crops_are_stacked_as_such_and_infer_the_same(tiny_model):
    """Decoders hand over [H, W, 3] memory seen as [3, H, W]: the batch keeps that layout (a plain copy),
    and the forward gives exactly what a channels-first batch gives."""
    from server.engine.worker import channels_last_view

    crops = [x.permute(1, 2, 0).contiguous().permute(2, 0, 1) for x in images(5)]
    assert all(channels_last_view(c) for c in crops) and not channels_last_view(images(1)[0])
    batch = stack_batch(crops, pin=False)
    assert batch.shape == (5, 3, 64, 64) and batch.permute(0, 2, 3, 1).is_contiguous()
    reference = torch.stack([c.contiguous() for c in crops])
    assert torch.equal(batch, reference)
    for a, b in zip(infer(tiny_model, MAME, batch, top_k=3), infer(tiny_model, MAME, reference, top_k=3)):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))


def arena_file(directory, crops: list[torch.Tensor]) -> str:
    """A front-end's crop arena as the engine finds it: [H, W, 3] crops back to back in a file."""
    fd, path = tempfile.mkstemp(prefix="crops-", dir=directory)
    with os.fdopen(fd, "wb") as file:
        file.writelines(crop.permute(1, 2, 0).contiguous().numpy().tobytes() for crop in crops)
    return path


def shared_items(loop, variant: str, path: str, count: int) -> list[WorkItem]:
    from server.http.frontend_requests import CropArenas

    crop = 3 * 64 * 64
    views = CropArenas().crops([(path, i * crop) for i in range(count)], (3, 64, 64))
    return [WorkItem("m", variant, MAME, view, 3, time.monotonic() + 60, loop.create_future(), loop,
                     shared_at=(path, i * crop)) for i, view in enumerate(views)]


def test_crops_in_shared_memory_are_copied_by_the_device_process_not_the_server(loop, tiny_model, tmp_path,
                                                                                monkeypatch):
    """A front-end's crops reach the forward without a copy in the server process: the device process
    reads them in the arena file. Where it cannot (the file is gone: its front-end ended before the device
    process first mapped it), the server stacks them from its own mapping, and nothing fails."""
    from server.engine import device_process

    cfg = parse_config(tiny_config()).models["tiny"]
    s = scheduler(max_batch_size=4, max_wait_ms=0)
    worker = device_process.ProcessWorker(torch.device("cpu"), {"m": cfg}, s, Metrics(), torch_threads=1)
    worker.launch(None)
    stacked = []
    real_stack = device_process.stack_into
    monkeypatch.setattr(device_process, "stack_into", lambda images, memory: (
        stacked.append(len(images)), real_stack(images, memory))[1])
    xs, ys = images(3), images(2, seed=1)
    readable = shared_items(loop, "a", arena_file(tmp_path, xs), 3)
    gone_path = arena_file(tmp_path, ys)
    gone = shared_items(loop, "b", gone_path, 2)  # mapped here, then its file is removed
    os.unlink(gone_path)
    out = run_worker(worker, loop, [readable, gone])
    for x, result in zip(xs + ys, out):
        assert isinstance(result, ImageResult), result
        scores, indices, tokens, _, _ = infer(tiny_model, MAME, x[None], top_k=3)
        assert result.indices == indices[0].tolist() and result.tokens_per_block == tokens[0].tolist()
        assert result.scores == pytest.approx(scores[0].tolist(), abs=1e-5)
    assert stacked == [2]  # only the batch whose file was gone
    assert worker._process.exitcode == 0


def test_a_batch_is_taken_when_the_device_can_have_it_so_it_fills_while_the_device_is_busy(loop):
    """While both slabs are in flight, requests that come keep queueing: the batch taken when a slab comes
    back holds all of them, not only those that were due first."""
    from server.engine.device_process import ProcessWorker

    cfg = parse_config(tiny_config()).models["tiny"]
    s = scheduler(max_batch_size=4, max_wait_ms=0)
    worker = ProcessWorker(torch.device("cpu"), {"m": cfg}, s, Metrics(), torch_threads=1)
    worker.launch(None)
    busy = [worker._free.get(), worker._free.get()]  # as if two batches were running
    worker.start()
    first = [item(loop, "a", x) for x in images(1)]
    s.submit(first)
    time.sleep(0.3)  # due at once (max_wait_ms 0), but no slab is free
    later = [item(loop, "a", x) for x in images(2, seed=1)]
    s.submit(later)
    for slab in busy:
        worker._free.put(slab)
    s.close()
    worker.join(60)
    out = loop.run_until_complete(asyncio.gather(*(i.future for i in first + later)))
    assert [result.batch_size for result in out] == [3, 3, 3]


def test_shared_crops_are_read_within_their_files(tmp_path):
    from server.engine.shared_crops import SharedCrops

    crops = images(2)
    path = arena_file(tmp_path, crops)
    shared, slab, crop = SharedCrops(), torch.zeros(4 * 3 * 64 * 64, dtype=torch.uint8), 3 * 64 * 64
    shared.gather([(path, crop), (path, 0)], crop, slab)
    batch = slab[:2 * crop].view(2, 64, 64, 3).permute(0, 3, 1, 2)
    assert torch.equal(batch[0], crops[1]) and torch.equal(batch[1], crops[0])
    with pytest.raises(ValueError, match="outside"):
        shared.gather([(path, crop + 1)], crop, slab)
    with pytest.raises(OSError):
        shared.gather([(str(tmp_path / "gone"), 0)], crop, slab)
    os.unlink(path)  # its front-end ended: the mapping goes when another file is first read
    shared.gather([(arena_file(tmp_path, crops), 0)], crop, slab)
    assert path not in shared._mapped
