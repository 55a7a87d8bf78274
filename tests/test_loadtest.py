"""Unit tests of the load generator's pure parts, plus its behaviour against a closed port."""
from __future__ import annotations

import io
import itertools
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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


def ok(
    group: str, at: float, latency: float, queue: float = 1.0, infer: float = 10.0, tokens: int = 50
) -> Outcome:
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
    assert [s.images[0].name for s in drawn[:4]] == [
        images[0].name,
        images[1].name,
        images[2].name,
        images[0].name,
    ]
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
    assert (
        json.loads(json.dumps(sweep_to_dict(points, SweepLimits())))["saturation"][0]["variant"] == "baseline"
    )

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


def test_cli_rejects_bad_arguments_with_a_clear_message(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
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


# --- client-side waiting, timeouts and arguments (audit defects 3-6) -----------------------------------

class SlowHandler(BaseHTTPRequestHandler):
    """Answers every classify request with a valid one-image answer after SLOW_S, on a kept-alive
    connection: a stand-in for a server whose every answer takes that long."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        time.sleep(SLOW_S)
        body = json.dumps({"variant": "v", "tokens": {"final": 5},
                           "timings_ms": {"queue": 0.0, "inference": SLOW_S * 1000}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


SLOW_S = 0.2


@pytest.fixture
def slow_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), SlowHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_send_lag_shows_the_wait_for_a_pooled_connection(slow_url: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Four requests at once through one connection to a 0.2 s server: the last waits ~0.6 s in the
    client's pool. That wait is latency, and the footer's send lag must show it (it used to be ~0 ms)."""
    out = tmp_path / "report.json"
    code = main(["--url", slow_url, "--rate", "1000", "--requests", "4", "--max-connections", "1",
                 "--quiet", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["total"]["ok"] == 4
    lag_ms, worst_ms = report["max_send_lag_ms"], report["total"]["latency_ms"]["max"]
    assert lag_ms > 2.5 * SLOW_S * 1000
    # The slowest request's latency is its wait in the client plus one server answer, no more (the upper
    # margin is for a loaded machine: the old code fails the lag bound above by 500 ms).
    assert SLOW_S * 1000 - 20 < worst_ms - lag_ms < SLOW_S * 1000 + 400
    footer = capsys.readouterr().out.splitlines()[-2:]
    assert f"max client send lag {lag_ms:.1f} ms" in footer[0]
    assert footer[1].startswith("note: a request waited up to") and "--max-connections" in footer[1]


def test_timeout_bounds_the_wait_for_a_pooled_connection(slow_url: str, tmp_path: Path) -> None:
    """Five requests at once through one connection to a 0.2 s server with --timeout 0.3: the ones still
    waiting for the connection after 0.3 s give up as pool_timeout, and no request lasts much longer
    than the pool wait plus one answer (httpx alone let them wait for one answer after another)."""
    out = tmp_path / "report.json"
    main(
        [
            "--url",
            slow_url,
            "--rate",
            "1000",
            "--requests",
            "5",
            "--max-connections",
            "1",
            "--timeout",
            "0.3",
            "--quiet",
            "--json",
            str(out),
        ]
    )
    report = json.loads(out.read_text())
    total = report["total"]
    assert 1 <= total["ok"] <= 2 and total["errors"] == {"pool_timeout": 5 - total["ok"]}
    # Unbounded, the last would wait for the four answers before it (1,000 ms); the margin is for a loaded
    # machine.
    assert total["latency_ms"]["max"] < (0.3 + SLOW_S) * 1000 + 350
    assert 300 <= report["max_send_lag_ms"] < 800  # the give-ups waited the whole --timeout


def test_max_connections_below_one_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    for value in (0, -1):
        with pytest.raises(ValueError, match="--max-connections must be at least 1"):
            LoadPlan("open", 10, 1.0, rate_rps=1.0, max_connections=value)
        with pytest.raises(SystemExit) as exit_info:
            main(
                [
                    "--url",
                    f"http://127.0.0.1:{free_port()}",
                    "--max-connections",
                    str(value),
                    "--requests",
                    "1",
                    "--timeout",
                    "1",
                    "--quiet",
                ]
            )
        assert exit_info.value.code == 2
        assert f"--max-connections must be at least 1, got {value}" in capsys.readouterr().err


def test_unwritable_output_paths_are_refused_before_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    url = f"http://127.0.0.1:{free_port()}"
    for argv in (
        ["--json", str(blocker / "x.json")],
        ["--sweep", "--variant", "a", "--plot", str(blocker / "x.png"), "--json", str(tmp_path / "s.json")],
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["--url", url, "--requests", "2", "--duration", "1", "--quiet", *argv])
        assert exit_info.value.code == 2
        assert str(blocker) in capsys.readouterr().err
    assert not (tmp_path / "s.json").exists()
    # A missing folder is made, as --plot always did.
    out = tmp_path / "results" / "run.json"
    assert main(["--url", url, "--requests", "2", "--duration", "1", "--quiet", "--json", str(out)]) == 1
    assert json.loads(out.read_text())["total"]["sent"] == 2


def test_sweep_json_is_written_before_the_plot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_plot(*args, **kwargs) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("loadtest.load.plot_sweep", failing_plot)
    out = tmp_path / "sweep.json"
    with pytest.raises(OSError, match="disk full"):
        main(["--url", f"http://127.0.0.1:{free_port()}", "--sweep", "--variant", "a", "--rate", "50",
              "--sweep-steps", "2", "--duration", "0.2", "--requests", "3", "--quiet", "--json", str(out)])
    sweep = json.loads(out.read_text())
    assert sweep["points"][0]["step"]["errors"] == {"connection_error": 3}
    assert sweep["settings"]["variants"] == ["a"] and sweep["settings"]["rates"] == [50.0, 75.0]


def test_json_report_holds_every_setting(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    url = f"http://127.0.0.1:{free_port()}"
    main(["--url", url, "--experiment", "ab", "--users", "7", "--user-header", "X-Key", "--top-k", "3",
          "--images-per-request", "2", "--rate", "50", "--requests", "2", "--duration", "1", "--timeout", "2",
          "--max-connections", "9", "--seed", "5", "--quiet", "--json", str(out)])
    assert json.loads(out.read_text())["meta"] == {
        "url": url, "model": None, "variants": [], "experiment": "ab", "users": 7, "user_header": "X-Key",
        "top_k": 3, "images_per_request": 2, "protocol": "v1", "mode": "open", "max_requests": 2,
        "duration_s": 1.0,
        "rate_rps": 50.0, "concurrency": None, "timeout_s": 2.0, "max_connections": 9, "seed": 5,
        "images": len(load_images(None)),
    }


def test_wait_ready_giving_up_exits_like_a_down_server(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--url", f"http://127.0.0.1:{free_port()}", "--wait-ready", "0.2", "--quiet"]) == 1
    assert "was not ready after 0.2 s" in capsys.readouterr().err


def test_flags_that_would_be_ignored_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    cases = [
        (["--max-p99-ms", "0"], "--max-p99-ms only applies with --sweep"),
        (["--plot", "x.png"], "--plot only applies with --sweep"),
        (["--sweep-steps", "3"], "--sweep-steps only applies with --sweep"),
        (["--users", "5"], "--users only applies with --experiment"),
        (["--user-header", "X-Key"], "--user-header only applies with --experiment"),
        (["--concurrency", "4"], "--concurrency only applies with --mode closed"),
        (["--mode", "closed", "--rate", "5"], "--rate only applies with --mode open"),
        (["--sweep", "--variant", "a", "--experiment", "ab"], "cannot use --experiment"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(
                [
                    "--url",
                    f"http://127.0.0.1:{free_port()}",
                    "--requests",
                    "1",
                    "--duration",
                    "0.2",
                    "--quiet",
                    *argv,
                ]
            )
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("locust", path=str(Path(sys.executable).parent)) is None,
                    reason="locust is not installed (pip install -e '.[loadtest]')")
def test_locust_refuses_bad_options_at_start() -> None:
    """A bad option is one line and exit 2 before any user starts, even headless without -t (it used to
    print a traceback per user and then wait forever with nothing to send)."""
    root = Path(__file__).resolve().parent.parent
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
    }
    cases = [(["--variants", "baseline:x"], "variant weight must be a number"),
             (["--images", str(root / "no-such-dir")], "does not exist"),
             (["--top-k", "-1"], "--top-k must be")]
    for argv, message in cases:
        result = subprocess.run(
            [str(Path(sys.executable).parent / "locust"), "-f", "loadtest/locustfile.py", "--headless",
             "-H", f"http://127.0.0.1:{free_port()}", "-u", "2", "-r", "2", *argv],
            check=False, capture_output=True, text=True, timeout=60, env=env, cwd=root)
        assert result.returncode == 2, result.stderr
        assert message in result.stderr and "Traceback" not in result.stderr


def test_locust_variant_weights_are_positive_finite_numbers_and_names_are_trimmed():
    from loadtest.variants import parse_weighted_variants

    assert parse_weighted_variants(" baseline:1, mame-0.9:2 ,") == {"baseline": 1.0, "mame-0.9": 2.0}
    assert parse_weighted_variants(" a :3") == {"a": 3.0}  # " a " was sent as a variant name: a 404
    assert parse_weighted_variants("") == {}
    for bad in ("a:nan", "a:inf", "a:0", "a:-1", ":2", "a:x"):  # nan and inf passed, then every task failed
        with pytest.raises(ValueError):
            parse_weighted_variants(bad)


def test_the_engine_benchmark_paces_its_traffic_and_measures_the_bare_channel_beside_it() -> None:
    """`python -m loadtest.engine --rate R --floor`: R requests a second reach the engine, and the same
    traffic answered at once by a bare event loop gives the floor the engine's figure is read against."""
    done = subprocess.run(
        [sys.executable, "-m", "loadtest.engine", "--images-per-request", "1", "--concurrency", "16",
         "--rate", "150", "--seconds", "2", "--floor"],
        check=False, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert done.returncode == 0, done.stderr[-2000:]
    rate = float(re.search(r"in [\d.]+ s \((\d+) requests/s\)", done.stdout).group(1))
    assert 100 <= rate <= 160, done.stdout  # paced, not as fast as the engine answers
    engine = float(re.search(r"engine CPU\s+([\d.]+) ms per request", done.stdout).group(1))
    floor = float(re.search(r"bare channel: ([\d.]+) ms CPU per request", done.stdout).group(1))
    assert 0 < floor < engine, done.stdout
    ratio = float(re.search(r"the engine spends ([\d.]+)x that", done.stdout).group(1))
    assert ratio == pytest.approx(engine / floor, rel=0.05)
