"""Unit tests of the load generator's pure parts, plus its behaviour against a closed port."""
from __future__ import annotations

import io
import itertools
import json
import random
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loadtest.images import bundled_samples_dir, generated_images, images_from_dir, load_images
from loadtest.load import LoadPlan, Target, main, poisson_offsets, read_answer, request_specs
from loadtest.report import UNKNOWN_VARIANT, Outcome, format_table, percentiles, summarize
from loadtest.sweep import (
    SweepLimits,
    SweepPoint,
    format_saturation,
    plot_sweep,
    saturation,
    stop_reason,
    sweep_rates,
    sweep_to_dict,
)


def ok(group: str, at: float, latency: float, queue: float = 1.0, infer: float = 10.0, tokens: int = 50) -> Outcome:
    return Outcome(group, "200", at, latency, queue_ms=queue, inference_ms=infer, final_tokens=tokens)


def failed(group: str, status: str, at: float, latency: float) -> Outcome:
    return Outcome(group, status, at, latency)


# --- percentiles -----------------------------------------------------------------------------------

def test_percentiles_match_numpy_linear_interpolation() -> None:
    rng = np.random.default_rng(0)
    for size in (1, 2, 7, 100, 1001):
        values = rng.exponential(20.0, size).tolist()
        qs = (0.0, 50.0, 90.0, 99.0, 99.9, 100.0)
        assert percentiles(values, qs) == pytest.approx(np.percentile(values, qs).tolist(), rel=1e-12)


def test_percentiles_reject_empty_input_and_bad_q() -> None:
    with pytest.raises(ValueError, match="empty"):
        percentiles([], (50.0,))
    with pytest.raises(ValueError, match="outside"):
        percentiles([1.0], (101.0,))


# --- report aggregation ----------------------------------------------------------------------------

def test_summarize_groups_by_variant_and_counts_errors_by_status() -> None:
    outcomes = [
        ok("baseline", 0.0, 0.100, queue=2.0, infer=20.0, tokens=197),
        ok("baseline", 1.0, 0.300, queue=4.0, infer=30.0, tokens=197),
        failed("baseline", "503", 2.0, 0.001),
        ok("mame-0.9", 0.5, 0.050, tokens=90),
        ok("mame-0.9", 1.5, 0.070, tokens=110),
        failed("mame-0.9", "client_timeout", 3.0, 1.0),  # the last answer: done at 4.0 s
        failed(UNKNOWN_VARIANT, "404", 3.5, 0.002),
    ]
    report = summarize(outcomes, "open", offered_rps=2.0)
    assert report.elapsed_s == pytest.approx(4.0)
    assert report.send_window_s == pytest.approx(3.5)
    by_name = {v.variant: v for v in report.variants}
    assert list(by_name) == sorted(by_name)

    base = by_name["baseline"]
    assert (base.sent, base.ok, base.errors) == (3, 2, {"503": 1})
    assert base.sent_rps == pytest.approx(3 / 3.5)
    assert base.ok_rps == pytest.approx(2 / 4.0)
    assert base.latency_ms["p50"] == pytest.approx(200.0)
    assert base.latency_ms["max"] == pytest.approx(300.0)
    assert base.queue_ms_mean == pytest.approx(3.0)
    assert base.inference_ms_mean == pytest.approx(25.0)
    assert base.final_tokens_mean == pytest.approx(197.0)
    assert base.error_rate == pytest.approx(1 / 3)

    mame = by_name["mame-0.9"]
    assert (mame.sent, mame.ok, mame.errors) == (3, 2, {"client_timeout": 1})
    assert mame.final_tokens_mean == pytest.approx(100.0)
    # Latency percentiles cover successful requests only: the 1 s timeout is not among them.
    assert mame.latency_ms["max"] == pytest.approx(70.0)

    unknown = by_name[UNKNOWN_VARIANT]
    assert (unknown.sent, unknown.ok, unknown.latency_ms["p50"], unknown.queue_ms_mean) == (1, 0, None, None)

    total = report.total
    assert (total.sent, total.ok) == (7, 4)
    assert total.errors == {"404": 1, "503": 1, "client_timeout": 1}

    table = format_table(report)
    for name in ("baseline", "mame-0.9", UNKNOWN_VARIANT, "503:1", "client_timeout:1", "open loop"):
        assert name in table
    assert json.loads(json.dumps(report.to_dict()))["total"]["sent"] == 7


def test_summarize_of_a_single_request_uses_the_run_time_as_window() -> None:
    report = summarize([ok("a", 0.0, 0.25)], "closed", concurrency=1)
    assert report.send_window_s == pytest.approx(0.25)
    assert report.total.sent_rps == pytest.approx(4.0)
    assert "closed loop, concurrency 1" in format_table(report)


# --- arrivals and requests ---------------------------------------------------------------------------

def test_poisson_offsets_are_bounded_by_count_and_duration() -> None:
    by_count = list(poisson_offsets(100.0, 50, 1000.0, random.Random(1)))
    assert len(by_count) == 50
    by_time = list(poisson_offsets(100.0, 10**6, 2.0, random.Random(1)))
    assert by_time[0] == 0.0 and max(by_time) < 2.0
    assert all(b > a for a, b in itertools.pairwise(by_time))


def test_poisson_offsets_have_the_set_rate_and_exponential_gaps() -> None:
    offsets = list(poisson_offsets(50.0, 20000, 10**6, random.Random(7)))
    gaps = np.diff(offsets)
    assert gaps.mean() == pytest.approx(1 / 50.0, rel=0.03)
    # Exponential gaps: standard deviation equals the mean (a fixed-interval schedule would give 0).
    assert gaps.std() == pytest.approx(gaps.mean(), rel=0.05)
    with pytest.raises(ValueError, match="rate must be positive"):
        next(poisson_offsets(0.0, 10, 1.0, random.Random(0)))


def test_request_specs_spread_variants_and_draw_user_keys_only_for_experiments() -> None:
    images = generated_images(3)
    specs = request_specs(Target("http://x", variants=("a", "b")), images, random.Random(0))
    drawn = [next(specs) for _ in range(3000)]
    share_a = sum(s.variant == "a" for s in drawn) / len(drawn)
    assert 0.45 < share_a < 0.55
    assert all(s.user_key is None for s in drawn)
    assert [s.images[0].name for s in drawn[:4]] == [images[0].name, images[1].name, images[2].name, images[0].name]
    assert all(len(s.images) == 1 for s in drawn)
    several = request_specs(Target("http://x", images_per_request=2), images, random.Random(0))
    assert [[i.name for i in next(several).images] for _ in range(2)] == [
        [images[0].name, images[1].name], [images[2].name, images[0].name]]

    experiment = request_specs(Target("http://x", experiment="tau-ab", users=5), images, random.Random(0))
    keys = {next(experiment).user_key for _ in range(200)}
    assert keys == {f"user-{i}" for i in range(5)}


def test_read_answer_takes_the_variant_and_timings_from_the_answer() -> None:
    body = {"variant": "mame-0.8", "tokens": {"final": 88}, "timings_ms": {"queue": 1.5, "inference": 30.0}}
    assert read_answer(200, body, None) == {
        "group": "mame-0.8", "status": "200", "queue_ms": 1.5, "inference_ms": 30.0, "final_tokens": 88,
        "images": 1,
    }
    other = {"variant": "mame-0.8", "tokens": {"final": 12}, "timings_ms": {"queue": 2.5, "inference": 30.0}}
    assert read_answer(200, {"request_id": "r", "results": [body, other]}, None) == {
        "group": "mame-0.8", "status": "200", "queue_ms": 2.0, "inference_ms": 30.0, "final_tokens": 50.0,
        "images": 2,
    }
    assert read_answer(200, {"results": []}, None)["status"] == "invalid_answer"
    assert read_answer(503, None, "baseline") == {"group": "baseline", "status": "503"}
    assert read_answer(404, None, None) == {"group": UNKNOWN_VARIANT, "status": "404"}
    assert read_answer(200, {"variant": "x"}, "x")["status"] == "invalid_answer"
    assert read_answer(200, None, None)["status"] == "invalid_answer"


def test_load_plan_rejects_impossible_settings() -> None:
    with pytest.raises(ValueError, match="positive rate"):
        LoadPlan("open", 10, 1.0, rate_rps=0.0)
    with pytest.raises(ValueError, match="concurrency"):
        LoadPlan("closed", 10, 1.0, concurrency=0)
    with pytest.raises(ValueError, match="request count"):
        LoadPlan("open", 0, 1.0, rate_rps=1.0)
    with pytest.raises(ValueError, match="duration"):
        LoadPlan("open", 10, 0.0, rate_rps=1.0)
    with pytest.raises(ValueError, match="mode"):
        LoadPlan("burst", 10, 1.0, rate_rps=1.0)


# --- sweep ---------------------------------------------------------------------------------------------

def step(ok_count: int, sent: int, p99_latency_s: float, window_s: float = 10.0):
    outcomes = [ok("v", window_s * i / sent, p99_latency_s) for i in range(ok_count)]
    outcomes += [failed("v", "503", window_s * i / sent, 0.001) for i in range(ok_count, sent)]
    return summarize(outcomes, "open").total


def test_stop_reason_names_the_limit_that_was_crossed() -> None:
    limits = SweepLimits(max_p99_ms=500.0, max_error_rate=0.05, min_goodput_ratio=0.9)
    assert stop_reason(step(100, 100, 0.1), limits) is None
    assert "error rate" in stop_reason(step(90, 100, 0.1), limits)
    assert "p99" in stop_reason(step(100, 100, 0.8), limits)
    # Every answer ok and fast enough, but finishing long after the sends: the server fell behind.
    slow_drain = step(100, 100, 0.1)
    behind = summarize([ok("v", i * 0.1, 0.1 + i * 0.05) for i in range(100)], "open").total
    assert stop_reason(slow_drain, SweepLimits(max_p99_ms=10**6)) is None
    assert "ok" in stop_reason(behind, SweepLimits(max_p99_ms=10**6))
    assert stop_reason(summarize([], "open").total, limits) == "no request was sent"


def test_sweep_limits_and_rates_reject_bad_values() -> None:
    assert sweep_rates(2.0, 2.0, 4) == [2.0, 4.0, 8.0, 16.0]
    with pytest.raises(ValueError, match="factor"):
        sweep_rates(1.0, 1.0, 3)
    with pytest.raises(ValueError, match="start rate"):
        sweep_rates(0.0, 2.0, 3)
    with pytest.raises(ValueError, match="error rate"):
        SweepLimits(max_error_rate=1.5)


def test_saturation_reports_the_last_rate_within_limits(tmp_path: Path) -> None:
    points = [
        SweepPoint("baseline", 5.0, step(50, 50, 0.05), None),
        SweepPoint("baseline", 10.0, step(100, 100, 0.08), None),
        SweepPoint("baseline", 20.0, step(150, 200, 2.0), "p99 2000 ms > 1000 ms"),
        SweepPoint("mame-0.9", 5.0, step(50, 50, 0.03), None),
    ]
    rows = {r.variant: r for r in saturation(points)}
    assert rows["baseline"].max_rate_within_limits == 10.0
    assert rows["baseline"].p99_ms_at_max == pytest.approx(80.0)
    assert rows["baseline"].stopped_by.startswith("p99")
    assert rows["baseline"].peak_ok_rps == max(p.step.ok_rps for p in points[:3])
    assert rows["mame-0.9"].stopped_by == "rate ladder exhausted"
    table = format_saturation(saturation(points))
    assert table.count("\n") == 3 and "| baseline | 10.0 |" in table
    assert json.loads(json.dumps(sweep_to_dict(points, SweepLimits())))["saturation"][0]["variant"] == "baseline"

    png = tmp_path / "img" / "sweep.png"
    plot_sweep(points, png, "test")
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width > 400


# --- images --------------------------------------------------------------------------------------------

def test_generated_images_decode_and_differ() -> None:
    images = generated_images(4)
    decoded = [Image.open(io.BytesIO(i.data)) for i in images]
    assert all(d.format == "PNG" and d.size == (224, 224) for d in decoded)
    assert len({i.data for i in images}) == 4


def test_images_from_dir_reads_images_and_explains_an_empty_dir(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        images_from_dir(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="no image files"):
        images_from_dir(tmp_path)
    Image.new("RGB", (32, 32), "red").save(tmp_path / "red.JPG", format="JPEG")
    [payload] = images_from_dir(tmp_path)
    assert (payload.name, payload.content_type) == ("red.JPG", "image/jpeg")


def test_load_images_defaults_to_the_bundled_samples_when_present() -> None:
    samples = bundled_samples_dir()
    images = load_images(None)
    if samples is not None and any(p.suffix.lower() in (".jpg", ".png") for p in samples.iterdir()):
        assert {i.name for i in images} <= {p.name for p in samples.iterdir()}
    else:
        assert images[0].name.startswith("generated-")


# --- command line -------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_cli_rejects_bad_arguments_with_a_clear_message(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cases = [
        (["--images", str(tmp_path / "nope")], "does not exist"),
        (["--sweep"], "name them with --variant"),
        (["--sweep", "--variant", "a", "--mode", "closed"], "cannot run with --mode closed"),
        (["--rate", "-1"], "positive rate"),
        (["--variant", "a,,b"], "empty variant name"),
        (["--top-k", "50"], "1..20"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


def test_cli_against_a_closed_port_reports_connection_errors_and_fails(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    url = f"http://127.0.0.1:{free_port()}"
    code = main(["--url", url, "--variant", "a", "--rate", "200", "--requests", "5", "--duration", "5",
                 "--quiet", "--json", str(out)])
    assert code == 1
    report = json.loads(out.read_text())
    assert report["total"]["sent"] == 5
    assert report["variants"][0]["errors"] == {"connection_error": 5}


def test_closed_loop_stops_at_the_request_count(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    url = f"http://127.0.0.1:{free_port()}"
    main(["--url", url, "--mode", "closed", "--concurrency", "3", "--requests", "7", "--duration", "30",
          "--quiet", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["total"]["sent"] == 7 and report["concurrency"] == 3
