"""The judge: its decisions on recorded Prometheus answers, and its PromQL against a real Prometheus that
scrapes an exporter with the server's own metric definitions."""

import json
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from abtest import judge as jd
from abtest.guardrails import JudgedExperiment, judged_experiments
from abtest.split_store import FileSplitStore, SplitState, with_change

DATA = Path(__file__).parent / "data"
EXPERIMENT = {
    "model": "vit-b16",
    "split": {"baseline": 0.5, "mame-0.9": 0.25, "mame-0.2": 0.25},
    "sticky": "header:X-User-Id",
    "shadow": {"variant": "baseline", "rate": 1.0},
    "guardrails": [
        {"metric": "shadow_agreement", "min": 0.98},
        {"metric": "error_rate_diff", "max": 0.005},
        {"metric": "p95_latency_ratio", "max": 1.5},
    ],
    "on_fail": "rollback",
}


def write_config(path, **changes):
    path.write_text(yaml.safe_dump({"experiments": {"tau-ab": {**EXPERIMENT, **changes}}}))
    return path


# ------------------------------------------------------------------------------------------ schema


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"guardrails": [{"metric": "shadow_agreement", "min": 1.5}]}, "rate limit"),
        ({"guardrails": [{"metric": "latency", "max": 1}]}, "unknown guardrail metric"),
        ({"guardrails": [{"metric": "p95_latency_ratio", "min": 1, "max": 2}]}, "exactly one"),
        ({"control": "nope"}, "control"),
        ({"ramp": {"steps": [0.05, 0.01]}}, "increase"),
        ({"ramp": {"steps": [0.01, 0.6]}}, "exceed 100"),
        ({"on_fail": "panic"}, "on_fail"),
    ],
)
def test_bad_guardrail_config_names_the_key(change, message):
    with pytest.raises(ValueError, match=message):
        judged_experiments({"experiments": {"tau-ab": {**EXPERIMENT, **change}}}, "serving.yaml")


def test_experiments_without_guardrails_are_not_judged_and_ramp_splits():
    plain = {k: v for k, v in EXPERIMENT.items() if k != "guardrails"}
    assert judged_experiments({"experiments": {"a": plain}}) == {}
    exp = JudgedExperiment.model_validate({**EXPERIMENT, "ramp": {"steps": [0.01, 0.05, 0.25]}})
    assert exp.control_variant == "baseline"
    assert exp.ramp_split(1) == {"mame-0.9": 0.05, "mame-0.2": 0.05, "baseline": pytest.approx(0.9)}


# --------------------------------------------------------------------------- decisions, recorded answers


def recorded():
    """Answers of a real Prometheus (2.x) to `queries()`, recorded by the e2e test below."""
    return jd.data_from_answers(json.loads((DATA / "abtest_prometheus_answers.json").read_text()))


def test_recorded_answers_parse_and_decide():
    exp = JudgedExperiment.model_validate(EXPERIMENT)
    data = recorded()
    bad = {g.metric: jd.decide(g, data, "mame-0.2", "baseline", exp.level) for g in exp.guardrails}
    good = {g.metric: jd.decide(g, data, "mame-0.9", "baseline", exp.level) for g in exp.guardrails}
    assert bad["shadow_agreement"].state == "failing"
    assert good["shadow_agreement"].state != "failing"
    assert {d.state for d in good.values()} <= {"passing", "inconclusive"}
    assert data.histogram("baseline").total > 0
    report = jd.variant_report(data, "mame-0.2", "baseline", 0.95)
    assert report["shadow_agreement"]["high"] < 0.98 and report["p95_latency_ratio"]["estimate"] > 0


def test_parse_vector_refuses_error_answers():
    with pytest.raises(jd.PrometheusError, match="bad_data"):
        jd.parse_vector({"status": "error", "errorType": "bad_data", "error": "parse error"})
    with pytest.raises(jd.PrometheusError, match="vector"):
        jd.parse_vector({"status": "success", "data": {"resultType": "matrix", "result": []}})


def test_promql_is_built_from_the_one_metric_table():
    q = jd.promql("errors", "tau-ab", 3600)
    assert q == (
        'sum by (variant) (increase(mame_requests_total{experiment="tau-ab", status=~"5..", '
        'status!="503"}[3600s]))'
    )
    assert 'experiment="a\\"b"' in jd.promql("requests", 'a"b', 60)  # a name cannot break out of its string


def _decision(state, n=5000.0):
    return jd.sequential.Decision(state, 0.5, 0.4, 0.6, 0.05, n)


def test_plan_rolls_back_alerts_and_ramps():
    ramped = JudgedExperiment.model_validate(
        {
            **EXPERIMENT,
            "split": {"baseline": 0.9, "mame-0.9": 0.1},
            "ramp": {"steps": [0.1, 0.5], "min_samples": 100},
        }
    )
    entry = with_change(
        SplitState(), "e", {"baseline": 0.9, "mame-0.9": 0.1}, action="set", source="judge", ramp_step=0
    ).experiments["e"]
    keys = [("mame-0.9", g.metric) for g in ramped.guardrails]
    passing = {k: _decision("passing") for k in keys}
    verdict = jd.plan(ramped, entry, passing, {k: 150.0 for k in keys})
    assert (
        verdict.action == "ramp"
        and verdict.ramp_step == 1
        and verdict.split == {"mame-0.9": 0.5, "baseline": 0.5}
    )
    assert jd.plan(ramped, entry, passing, {k: 50.0 for k in keys}).action == "none"  # too few in this step
    one_open = {**passing, keys[1]: _decision("inconclusive")}
    assert jd.plan(ramped, entry, one_open, {k: 150.0 for k in keys}).action == "none"
    failing = {**passing, keys[0]: _decision("failing")}
    rollback = jd.plan(ramped, entry, failing, {})
    assert rollback.action == "rollback" and rollback.split == {"baseline": 1.0, "mame-0.9": 0.0}
    assert "shadow_agreement" in rollback.reason
    alert = jd.plan(ramped.model_copy(update={"on_fail": "alert"}), entry, failing, {})
    assert alert.action == "alert" and alert.split is None


# ---------------------------------------------------------------------------------- real Prometheus


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def prometheus_scraping(tmp_path):
    """A real Prometheus scraping, every 0.5 s, an exporter with the server's metric definitions."""
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus is not installed (apt-get install prometheus; .ci/run installs it)")
    from prometheus_client import start_http_server

    from server.engine.metrics import Metrics  # the server's own names and labels

    metrics = Metrics()
    exporter_port, prom_port = free_port(), free_port()
    httpd, _ = start_http_server(exporter_port, addr="127.0.0.1", registry=metrics.registry)
    (tmp_path / "prometheus.yml").write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "500ms", "evaluation_interval": "1s"},
                "scrape_configs": [
                    {"job_name": "mame", "static_configs": [{"targets": [f"127.0.0.1:{exporter_port}"]}]}
                ],
            }
        )
    )
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{prom_port}"
    try:
        yield metrics, url
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        httpd.shutdown()


def series_scraped(url, expr, minimum):
    try:
        answer = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=2).json()
    except (httpx.HTTPError, ValueError):
        return False
    result = answer.get("data", {}).get("result", [])
    return bool(result) and float(result[0]["value"][1]) >= minimum


@pytest.mark.e2e
def test_judge_rolls_back_a_bad_variant_from_real_prometheus(prometheus_scraping, tmp_path, capsys):
    metrics, url = prometheus_scraping
    model, exp = "vit-b16", "tau-ab"
    started = time.time() - 1
    labels = {v: (model, v, exp) for v in EXPERIMENT["split"]}
    shadow = {v: (model, exp, v, "baseline") for v in ("mame-0.9", "mame-0.2")}
    for key in labels.values():  # every series exists at 0 before traffic: increase() needs a first sample
        metrics.requests.labels(*key, "200").inc(0)
        metrics.requests.labels(*key, "500").inc(0)
        metrics.successful_request_duration.labels(*key)
    for key in shadow.values():
        metrics.shadow_comparisons.labels(*key).inc(0)
        metrics.shadow_agreements.labels(*key).inc(0)
    wait_for(lambda: series_scraped(url, "count(mame_shadow_comparisons_total)", 2), what="first scrape")
    for v, agree in (("mame-0.9", 399), ("mame-0.2", 300)):
        metrics.shadow_comparisons.labels(*shadow[v]).inc(400)
        metrics.shadow_agreements.labels(*shadow[v]).inc(agree)
    for key in labels.values():
        metrics.requests.labels(*key, "200").inc(400)
        for i in range(400):
            metrics.successful_request_duration.labels(*key).observe(0.02 + 0.001 * (i % 10))
    wait_for(lambda: series_scraped(url, "sum(mame_shadow_comparisons_total)", 800), what="traffic scraped")
    time.sleep(1.5)  # a few more scrapes, so that increase() has points after the change

    config = write_config(tmp_path / "serving.yaml")
    store = FileSplitStore(tmp_path / "splits.yaml")
    store.write(
        with_change(SplitState(), exp, EXPERIMENT["split"], action="set", source="operator", now=started)
    )
    judge = jd.Judge(config, store, jd.PrometheusClient(url))
    exp_cfg = JudgedExperiment.model_validate(EXPERIMENT)
    answers = {
        s: judge.prometheus.query(q)
        for s, q in jd.queries(exp, exp_cfg, int(time.time() - started) + 1).items()
    }
    (tmp_path / "answers.json").write_text(
        json.dumps(answers, indent=1)
    )  # how the recorded answers were made
    judge.evaluate_all()

    entry = store.read().experiments[exp]
    assert entry.split == {"baseline": 0.75, "mame-0.9": 0.25, "mame-0.2": 0.0}
    assert entry.changes[-1].action == "rollback" and entry.changes[-1].source == "judge"
    assert "mame-0.2: shadow_agreement" in entry.changes[-1].reason
    report = judge.report(exp)
    assert report["verdict"] == "rollback"
    assert report["guardrails"]["mame-0.2"]["shadow_agreement"]["state"] == "failing"
    assert report["variants"]["mame-0.2"]["shadow_agreement"]["estimate"] == pytest.approx(0.75, abs=0.01)
    assert report["guardrails"]["mame-0.9"]["shadow_agreement"]["state"] != "failing"
    server = jd.serve(judge, "127.0.0.1", 0)
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        text = httpx.get(f"{base}/metrics").text
        assert (
            'mame_judge_rollbacks_total{experiment="tau-ab",guardrail="shadow_agreement",'
            'variant="mame-0.2"} 1.0' in text
        )
        assert (
            'mame_judge_guardrail_state{experiment="tau-ab",guardrail="shadow_agreement",state="failing",'
            'variant="mame-0.2"} 1.0'
        ) in text
        assert httpx.get(f"{base}/v1/experiments/tau-ab").json()["verdict"] == "rollback"
        assert httpx.get(f"{base}/v1/experiments/nope").status_code == 404
    finally:
        server.shutdown()
    # judged again: the rolled-back variant has no share left, so nothing more happens to it
    judge.evaluate_all()
    assert store.read().experiments[exp].version == entry.version
    jd.main(["--config", str(config), "--prometheus", url, "--store", f"file:{store.path}", "--once"])
    once = json.loads(capsys.readouterr().out)
    assert once["tau-ab"]["verdict"] == "none" and once["tau-ab"]["split"]["mame-0.2"] == 0.0

    # the service as it is deployed: its own process, polling, serving /metrics, stopped by SIGTERM
    port = free_port()
    judge_proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "abtest.judge",
            "--config",
            str(config),
            "--prometheus",
            url,
            "--store",
            f"file:{store.path}",
            "--interval",
            "0.5",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=Path(__file__).parent.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        weight = 'mame_judge_split_weight{experiment="tau-ab",variant="mame-0.2"} 0.0'
        wait_for(lambda: _metrics_text(port) and weight in _metrics_text(port), what="the judge's /metrics")
    finally:
        judge_proc.terminate()
        _, stderr = judge_proc.communicate(timeout=10)
    assert judge_proc.returncode == 0, stderr
    assert store.read().experiments[exp].version == entry.version  # it judged, found nothing more to do


def _metrics_text(port):
    try:
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    except httpx.HTTPError:
        return ""


def test_judge_command_refuses_a_bad_config(tmp_path):
    config = write_config(tmp_path / "serving.yaml", guardrails=[{"metric": "shadow_agreement", "min": 2}])
    with pytest.raises(SystemExit, match="rate limit"):
        jd.main(["--config", str(config), "--store", f"file:{tmp_path / 's.yaml'}", "--once"])


class Replay:
    """Answers recorded from a real Prometheus, returned for the judge's own queries (any window)."""

    def __init__(self):
        answers = json.loads((DATA / "abtest_prometheus_answers.json").read_text())
        exp = JudgedExperiment.model_validate(EXPERIMENT)
        self.by_query = {_without_window(q): answers[s] for s, q in jd.queries("tau-ab", exp, 1).items()}

    def query(self, expr, at=None):
        return self.by_query[_without_window(expr)]


def _without_window(expr):
    return re.sub(r"\[\d+s\]", "[]", expr)


def test_judge_alert_mode_alerts_once_and_leaves_the_split(tmp_path):
    store = FileSplitStore(tmp_path / "splits.yaml")
    judge = jd.Judge(
        write_config(tmp_path / "serving.yaml", on_fail="alert"), store, Replay(), clock=lambda: 1e9
    )
    judge.evaluate_all()
    judge.evaluate_all()
    entry = store.read().experiments["tau-ab"]
    assert entry.split == EXPERIMENT["split"] and [c.action for c in entry.changes] == ["set"]
    assert judge.metrics.alerts.labels("tau-ab", "mame-0.2", "shadow_agreement")._value.get() == 1
    assert judge.report("tau-ab")["verdict"] == "alert"


def test_judge_does_not_overwrite_a_change_made_meanwhile(tmp_path):
    store = FileSplitStore(tmp_path / "splits.yaml")
    judge = jd.Judge(write_config(tmp_path / "serving.yaml"), store, Replay(), clock=lambda: 1e9)
    experiments = jd.load_judged_experiments(judge.config_path)
    entry = judge.ensure_entries(experiments).experiments["tau-ab"]
    # an operator changes the split after the judge read it, before it acts
    store.update(
        lambda s: with_change(
            s, "tau-ab", {"baseline": 1.0, "mame-0.9": 0.0, "mame-0.2": 0.0}, action="set", source="operator"
        )
    )
    verdict = judge.evaluate("tau-ab", experiments["tau-ab"], entry)
    assert verdict.action == "rollback"
    after = store.read().experiments["tau-ab"]
    assert after.changes[-1].source == "operator" and after.version == 2
    assert judge.metrics.rollbacks.labels("tau-ab", "mame-0.2", "shadow_agreement")._value.get() == 0


def test_judge_ramps_step_by_step_while_guardrails_pass(tmp_path):
    store = FileSplitStore(tmp_path / "splits.yaml")
    config = write_config(
        tmp_path / "serving.yaml",
        split={"baseline": 0.5, "mame-0.9": 0.5},
        guardrails=[{"metric": "shadow_agreement", "min": 0.98}, {"metric": "p95_latency_ratio", "max": 1.5}],
        ramp={"steps": [0.05, 0.25, 0.5], "min_samples": 100},
    )
    judge = jd.Judge(config, store, Replay())
    shares = []
    for _ in range(4):
        judge.evaluate_all()
        entry = store.read().experiments["tau-ab"]
        shares.append((entry.ramp_step, entry.split["mame-0.9"]))
    assert shares == [(1, 0.25), (2, 0.5), (2, 0.5), (2, 0.5)]  # starts at step 0 (0.05), stops at the last
    assert [c.action for c in entry.changes] == ["set", "ramp", "ramp"]
    assert judge.metrics.ramp_step.labels("tau-ab")._value.get() == 2
    assert judge.metrics.ramp_share.labels("tau-ab")._value.get() == 0.5
    assert judge.report("tau-ab")["guardrails"]["mame-0.9"]["shadow_agreement"]["state"] == "passing"


def test_judge_leaves_a_stopped_experiment_alone(tmp_path):
    store = FileSplitStore(tmp_path / "splits.yaml")
    store.write(with_change(SplitState(), "tau-ab", EXPERIMENT["split"], action="stop", source="admin"))
    judge = jd.Judge(write_config(tmp_path / "serving.yaml"), store, Replay(), clock=lambda: 1e9)
    judge.evaluate_all()  # mame-0.2 fails its guardrail, but the experiment is stopped
    assert store.read().experiments["tau-ab"].version == 1 and judge.report("tau-ab") is None
