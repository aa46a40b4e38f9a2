"""Deployment files, checked without a container engine: the compose file against the Compose specification's schema
and against the service's settings and CLI, the Prometheus config with promtool, the Kubernetes manifests against the
Kubernetes schemas, the Dockerfile with hadolint, and the lock file against pyproject's pins."""

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from service import metrics
from service.cli import build_parser
from service.settings import STACK_VARIABLES, Settings

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SETTINGS = {f"T2I_{name.upper()}" for name in Settings.model_fields}
K8S = ROOT / "deploy" / "k8s"
T2I_IMAGES = ("t2i-slim",)


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def t2i_services() -> dict[str, dict]:
    """Services running our image (YAML merge keys resolved by the loader)."""
    return {name: s for name, s in compose()["services"].items() if "t2i-slim" in s.get("image", "")}


def run(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, **kw)


# -- docker compose ------------------------------------------------------------------------------------------------
def test_compose_validates_against_the_compose_specification(tmp_path):
    checker = str(BIN / "check-jsonschema")
    result = run([checker, "--builtin-schema", "vendor.compose-spec", str(ROOT / "docker-compose.yml")])
    assert result.returncode == 0, result.stdout + result.stderr
    broken = compose()
    broken["services"]["api"]["depends_on"]["redis"]["condition"] = "service_maybe"
    (tmp_path / "bad.yml").write_text(yaml.safe_dump(broken))
    assert run([checker, "--builtin-schema", "vendor.compose-spec", str(tmp_path / "bad.yml")]).returncode != 0


def test_compose_sets_only_real_settings_and_documents_its_variables():
    services = t2i_services()
    assert set(services) == {"api", "worker", "worker-cpu"}
    for name, service in services.items():
        for key in service.get("environment", {}):
            assert key in SETTINGS, f"{name}: {key} is not a setting of the service"
    text = (ROOT / "docker-compose.yml").read_text()
    interpolated = set(re.findall(r"\$\{([A-Z0-9_]+)", text))
    assert interpolated and interpolated <= set(STACK_VARIABLES), interpolated - set(STACK_VARIABLES)
    example = (ROOT / ".env.example").read_text()
    for variable in interpolated | {"COMPOSE_PROFILES"}:
        assert f"\n{variable}=" in example


def test_compose_commands_ports_and_scrape_targets_match_the_cli():
    services = t2i_services()
    parser = build_parser()
    for name, service in services.items():
        parser.parse_args(service["command"])  # exits (fails the test) on an unknown command or option
    api = parser.parse_args(services["api"]["command"])
    assert api.command == "api" and api.host == "0.0.0.0"
    assert services["api"]["ports"][0].endswith(f":{api.port}") and services["api"]["environment"]["T2I_PORT"] == \
        str(api.port)
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    assert jobs["t2i-api"]["dns_sd_configs"][0]["port"] == api.port
    worker_sd = jobs["t2i-worker"]["dns_sd_configs"][0]
    for name in ("worker", "worker-cpu"):
        service = services[name]
        assert parser.parse_args(service["command"]).command == "worker"
        port = int(service["environment"]["T2I_WORKER_METRICS_PORT"])
        assert service["expose"] == [str(port)] and worker_sd["port"] == port and name in worker_sd["names"]
        assert service["environment"]["T2I_WORKER_METRICS_HOST"] == "0.0.0.0"
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    redis = compose()["services"]["redis"]
    assert "--appendonly" in redis["command"] and redis["healthcheck"]["test"][0] == "CMD"
    assert services["api"]["depends_on"]["redis"]["condition"] == "service_healthy"
    for name, service in compose()["services"].items():  # published on loopback unless STACK_BIND says otherwise
        assert all(port.startswith("${STACK_BIND:-127.0.0.1}:") for port in service.get("ports", [])), name
    grafana = compose()["services"]["grafana"]
    mounted = {v.split(":")[0] for v in grafana["volumes"]}
    assert {"./deploy/grafana/provisioning", "./deploy/grafana/dashboards"} <= mounted


def test_promtool_accepts_the_prometheus_config(tmp_path):
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found: install Debian's `prometheus` package (scripts/test.sh does)"
    result = run([promtool, "check", "config", str(ROOT / "deploy" / "prometheus" / "prometheus.yml")])
    assert result.returncode == 0, result.stdout + result.stderr
    (tmp_path / "bad.yml").write_text("scrape_configs:\n  - job_name: x\n    scrape_interval: soon\n")
    assert run([promtool, "check", "config", str(tmp_path / "bad.yml")]).returncode != 0


# -- the Dockerfile ------------------------------------------------------------------------------------------------
def test_hadolint_passes_on_the_dockerfile(tmp_path):
    hadolint = str(BIN / "hadolint")
    result = run([hadolint, str(ROOT / "Dockerfile")])
    assert result.returncode == 0, result.stdout + result.stderr
    (tmp_path / "Dockerfile").write_text("FROM python\nRUN apt-get install curl\n")
    assert run([hadolint, str(tmp_path / "Dockerfile")]).returncode != 0


def test_dockerfile_facts():
    text = (ROOT / "Dockerfile").read_text()
    assert "FROM ${CUDA_BASE} AS runtime-cuda" in text and "FROM runtime-${VARIANT}" in text
    assert "-r requirements.lock" in text
    assert re.search(r"^USER 10001$", text, re.M)  # not root
    health = re.search(r"^HEALTHCHECK .* CMD (\[.*\])$", text, re.M)
    assert health and build_parser().parse_args(eval(health.group(1))[1:]).command == "healthcheck"
    exposed = set(re.search(r"^EXPOSE (.*)$", text, re.M).group(1).split())
    assert exposed == {str(Settings().port), str(Settings().worker_metrics_port)}
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignore[[line.strip() for line in ignore].index("*")] == "*"  # everything out, then an allow-list
    for needed in ("!pyproject.toml", "!README.md", "!requirements.lock", "!service/", "!trainer/", "!wheelhouse/",
                   "!deploy/docker/no-wheelhouse/"):
        assert needed in ignore
    # Air-gapped builds: the base is a build argument, and no `# syntax=` line (BuildKit would pull that frontend).
    assert "ARG PYTHON_IMAGE=python:${PYTHON}-slim" in text and "FROM ${PYTHON_IMAGE} AS runtime-cpu" in text
    assert "ARG WHEELHOUSE=deploy/docker/no-wheelhouse" in text and "--no-index --find-links /wheelhouse" in text
    assert not re.search(r"^#\s*syntax\s*=", text, re.M | re.I)


def test_requirements_lock_agrees_with_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    locked = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            locked[name.lower().replace("_", "-")] = version
    for requirement in project["dependencies"]:
        name = re.split(r"[<>=!~\[ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")
        assert name in locked, f"{name} is a dependency but not in requirements.lock"
        if "==" in requirement:
            assert locked[name] == requirement.split("==")[1], requirement


# -- Kubernetes ----------------------------------------------------------------------------------------------------
def manifests() -> list[tuple[str, dict]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in K8S.glob("*.yaml")
                                                        if p.name != "kustomization.yaml")
    return [(name, doc) for name in kustomization["resources"]
            for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def test_kubernetes_manifests_validate_against_the_schemas():
    checked = 0
    for name, doc in manifests():
        if doc["apiVersion"].startswith("keda.sh/"):
            continue  # a CRD: checked below
        kubernetes_validate.validate(doc, "1.30", strict=True)
        checked += 1
    assert checked >= 8
    broken = next(doc for _, doc in manifests() if doc["kind"] == "Deployment")
    broken["spec"]["template"]["spec"]["containers"][0]["imagePullPolizy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.30", strict=True)


def test_kubernetes_workers_gpus_probes_scraping_and_autoscaling():
    docs = {(doc["kind"], doc["metadata"]["name"]): doc for _, doc in manifests()}
    parser = build_parser()
    worker = docs[("Deployment", "t2i-worker")]["spec"]["template"]
    container = worker["spec"]["containers"][0]
    assert parser.parse_args(container["args"]).command == "worker"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {e["name"]: e.get("value") for e in container["env"]}
    port = int(env["T2I_WORKER_METRICS_PORT"])
    assert container["ports"][0]["containerPort"] == port == int(worker["metadata"]["annotations"]["prometheus.io/port"])
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert worker["spec"]["terminationGracePeriodSeconds"] >= 600
    api = docs[("Deployment", "t2i-api")]["spec"]["template"]["spec"]["containers"][0]
    api_args = parser.parse_args(api["args"])
    assert api_args.command == "api" and api["ports"][0]["containerPort"] == api_args.port
    for c in (container, api):
        assert {e["name"] for e in c["env"]} <= SETTINGS
    keys = next(e for e in api["env"] if e["name"] == "T2I_API_KEYS")  # it binds 0.0.0.0: it needs keys
    assert ("Secret", keys["valueFrom"]["secretKeyRef"]["name"]) in docs
    assert set(docs[("ConfigMap", "t2i-config")]["data"]) <= SETTINGS
    assert ("PodDisruptionBudget", "t2i-worker") in docs and ("StatefulSet", "redis") in docs
    assert "--appendonly" in docs[("StatefulSet", "redis")]["spec"]["template"]["spec"]["containers"][0]["args"]
    scaled = docs[("ScaledObject", "t2i-worker")]["spec"]
    assert scaled["scaleTargetRef"]["name"] == "t2i-worker" and scaled["minReplicaCount"] >= 1
    query = scaled["triggers"][0]["metadata"]["query"]
    assert re.findall(r"t2i_[a-z_]+", query) == [metrics.QUEUE_DEPTH._name]  # a metric the API exports
