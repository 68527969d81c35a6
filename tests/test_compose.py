"""docker-compose.yml (+ the GPU override) is a valid Compose file and keeps our rules.

Validity: `docker compose config -q` where a Docker client with compose exists;
everywhere, the files (interpolated with .env.example's values, as compose would)
are checked against the Compose specification's JSON schema, tests/data/compose-spec.json
(provenance in tests/data/README.md). Our rules: the services, healthchecks and
start-up order the deployment relies on, scalable workers, GPU only in the override,
and no secret written in the files.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).parents[1]
COMPOSE, GPU = ROOT / "docker-compose.yml", ROOT / "docker-compose.gpu.yml"
SCHEMA = Path(__file__).parent / "data" / "compose-spec.json"
SCHEMA_SHA256 = "46b7d35f19dd93a05f8fea530291bf84d881c1791ec167ecf0e6fb94e639d496"
WORKERS = ("worker-text", "worker-image", "worker-audio")
SERVICES = {"redis", "postgres", "migrate", "api", "flower", "prometheus", "grafana", *WORKERS}
SECRETS = ("POSTGRES_PASSWORD", "REDIS_PASSWORD", "MMQ_API_KEYS", "MMQ_FLOWER_BASIC_AUTH",
           "GRAFANA_ADMIN_PASSWORD")
# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?message}, ${VAR?message}; $$ is a "$".
VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def env_example() -> dict[str, str]:
    out = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def interpolate(node, env: dict[str, str]):
    """Compose's variable substitution on every string of a parsed file."""
    if isinstance(node, dict):
        return {k: interpolate(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, env) for v in node]
    if not isinstance(node, str):
        return node

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.groups()
        value = env.get(name)
        unset = value is None or (op is not None and op.startswith(":") and value == "")
        if op in ("?", ":?") and unset:
            raise KeyError(f"required variable {name} is missing: {arg}")
        if op in ("-", ":-") and unset:
            return arg
        return value or ""

    return VAR.sub(sub, node)


def load(path: Path, env: dict[str, str] | None = None) -> dict:
    raw = yaml.safe_load(path.read_text())  # safe_load resolves the `<<` merge keys
    return interpolate(raw, env_example() if env is None else env)


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft7Validator:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def errors(validator, doc: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(doc)]


def test_schema_file_is_the_recorded_copy():
    assert hashlib.sha256(SCHEMA.read_bytes()).hexdigest() == SCHEMA_SHA256


@pytest.mark.parametrize("path", [COMPOSE, GPU], ids=["compose", "gpu-override"])
def test_files_match_the_compose_schema(validator, path):
    assert errors(validator, load(path)) == []


def test_schema_rejects_broken_copies(validator):
    good = load(COMPOSE)
    broken = []
    bad = copy.deepcopy(good)
    bad["services"]["api"]["depends_on"]["redis"]["condition"] = "service_happy"
    broken.append(bad)
    bad = copy.deepcopy(good)
    bad["services"]["redis"]["healthcheck"]["intervall"] = "5s"
    broken.append(bad)
    bad = copy.deepcopy(good)
    bad["volume"] = bad.pop("volumes")  # a misspelt top-level key
    broken.append(bad)
    bad = copy.deepcopy(good)
    bad["services"]["worker-text"]["expose"] = "9100"  # must be a list
    broken.append(bad)
    bad = copy.deepcopy(good)
    bad["services"]["flower"]["deploy"] = {"resources": {"reservations": {
        "devices": [{"driver": "nvidia", "capabilities": "gpu"}]}}}  # must be a list
    broken.append(bad)
    for doc in broken:
        assert errors(validator, doc), "the schema accepted a broken file"


def test_a_missing_secret_stops_interpolation():
    for name in SECRETS:
        env = {k: v for k, v in env_example().items() if k != name}
        with pytest.raises(KeyError, match=name):
            load(COMPOSE, env)


@pytest.mark.skipif(shutil.which("docker") is None, reason="no docker client")
def test_docker_compose_config_accepts_the_files():
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode:
        pytest.skip("docker has no compose plugin here; the schema tests cover validity")
    env = {**os.environ, **env_example()}
    env.pop("COMPOSE_FILE", None)
    for files in (["-f", str(COMPOSE)], ["-f", str(COMPOSE), "-f", str(GPU)]):
        r = subprocess.run(["docker", "compose", *files, "config", "-q"], env=env,
                           capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0, r.stderr


# -- our rules ---------------------------------------------------------------------

def test_services_healthchecks_and_start_order():
    svc = load(COMPOSE)["services"]
    assert set(svc) == SERVICES
    for name in ("redis", "postgres", "api", "flower", *WORKERS):
        assert svc[name]["healthcheck"]["test"], name
    assert svc["redis"]["command"][1:5] == ["--appendonly", "yes",
                                            "--maxmemory-policy", "noeviction"]
    assert any(v.endswith(":/var/lib/postgresql/data") for v in svc["postgres"]["volumes"])
    assert svc["migrate"]["command"] == ["db", "upgrade"]
    assert svc["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    for name in ("api", *WORKERS):
        assert svc[name]["depends_on"] == {
            "redis": {"condition": "service_healthy"},
            "postgres": {"condition": "service_healthy"},
            "migrate": {"condition": "service_completed_successfully"}}, name
    assert svc["flower"]["depends_on"] == {"redis": {"condition": "service_healthy"}}


def test_api_and_flower():
    svc = load(COMPOSE)["services"]
    api, flower = svc["api"], svc["flower"]
    assert api["command"][:3] == ["api", "--host", "0.0.0.0"]
    assert api["ports"] == ["8000:8000"] and "/healthz" in " ".join(api["healthcheck"]["test"])
    assert api["environment"]["MMQ_API_KEYS"] == env_example()["MMQ_API_KEYS"]
    assert flower["command"][0] == "flower" and "--address=0.0.0.0" in flower["command"]
    assert flower["ports"] == ["5555:5555"]
    assert flower["environment"]["MMQ_FLOWER_BASIC_AUTH"] == env_example()[
        "MMQ_FLOWER_BASIC_AUTH"]
    assert "/healthcheck" in " ".join(flower["healthcheck"]["test"])


def test_workers_scale_and_export_metrics_inside_the_network():
    svc = load(COMPOSE)["services"]
    for name in WORKERS:
        w = svc[name]
        assert w["command"] == ["worker", name.removeprefix("worker-")]
        assert "container_name" not in w and "ports" not in w, name  # --scale needs both
        assert w["environment"]["MMQ_WORKER_METRICS_PORT"] == "9100"
        assert "9100" in [str(p) for p in w["expose"]]
        assert ":9100/metrics" in " ".join(w["healthcheck"]["test"]), name
        assert w["environment"]["MMQ_WORKER_METRICS_HOST"] == "0.0.0.0"  # inside the network
        assert w["environment"]["MMQ_DATABASE_URL"].endswith("@postgres:5432/mmq")
    assert all("container_name" not in s for s in svc.values())


def test_prometheus_scrapes_every_service_with_the_rules_and_grafana_shows_them():
    """Compose's Prometheus loads the repo's prometheus.yml and alerts.yml (mounted), and
    scrapes the API and each worker service by name (every --scale replica)."""
    svc = load(COMPOSE)["services"]
    mon = "./producer/ops/monitoring"
    prom = svc["prometheus"]
    assert f"{mon}:/etc/prometheus/mmq:ro" in prom["volumes"]
    assert "--config.file=/etc/prometheus/mmq/prometheus.yml" in prom["command"]
    cfg = yaml.safe_load((ROOT / mon / "prometheus.yml").read_text())
    assert cfg["rule_files"] == ["/etc/prometheus/mmq/alerts.yml"]
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert jobs["mmq-api"]["static_configs"][0]["targets"] == ["api:8000"]
    (dns,) = jobs["mmq-workers"]["dns_sd_configs"]
    assert sorted(dns["names"]) == sorted(WORKERS) and dns["port"] == 9100
    graf = svc["grafana"]
    assert f"{mon}/grafana/provisioning:/etc/grafana/provisioning:ro" in graf["volumes"]
    assert f"{mon}/grafana/dashboards:/var/lib/grafana/dashboards/mmq:ro" in graf["volumes"]
    assert graf["depends_on"] == {"prometheus": {"condition": "service_healthy"}}


def test_gpu_only_in_the_override():
    base = load(COMPOSE)["services"]
    assert all("deploy" not in s for s in base.values())  # CPU by default
    assert base["worker-text"]["environment"]["MMQ_DEVICE"] == "cpu"
    gpu = load(GPU)["services"]
    assert set(gpu) == set(WORKERS)
    for name in WORKERS:
        devices = gpu[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": "1", "capabilities": ["gpu"]}]
        assert gpu[name]["environment"]["MMQ_DEVICE"] == "cuda"


def test_no_secret_is_written_in_the_files():
    raw = yaml.safe_load(COMPOSE.read_text())
    for name, s in raw["services"].items():
        for key, value in (s.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET|KEYS?$|AUTH|TOKEN", key):
                # required from .env, or optional with an empty default (MMQ_ADMIN_KEYS)
                assert re.fullmatch(r"\$\{[A-Z0-9_]+(:\?[^}]+|:-)\}", str(value)), (name, key)
        url = (s.get("environment") or {}).get("MMQ_DATABASE_URL", "")
        assert not url or "${POSTGRES_PASSWORD:?" in url
    # Every value in the files (comments aside) and the Dockerfile's instructions.
    values = _strings(raw) + _strings(yaml.safe_load(GPU.read_text())) + [
        line for line in (ROOT / "Dockerfile").read_text().splitlines()
        if not line.lstrip().startswith("#")]
    for name in SECRETS:
        for part in re.split(r"[,:]", env_example()[name]):
            if part and part != "admin":
                assert not [v for v in values if part in v], f"{name}'s value is in a file"
        assert f"${{{name}:?" in COMPOSE.read_text()


def _strings(node) -> list[str]:
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in [str(k), *_strings(v)]]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return [str(node)]


def test_every_variable_has_a_value_or_a_default():
    known = set(env_example())
    for path in (COMPOSE, GPU):
        for m in VAR.finditer(path.read_text()):
            if m.group(0) != "$$":
                assert m.group(1) in known or m.group(2) in ("-", ":-"), m.group(0)


def test_dockerfile_is_multi_stage_with_mmq_entrypoint():
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM \S+ AS (\w+)", text, re.M)
    assert stages == ["builder", "runtime"]
    assert "COPY --from=builder /opt/venv /opt/venv" in text
    assert 'ENTRYPOINT ["mmq"]' in text and "ARG TORCH_VARIANT" in text
    assert "HF_HUB_OFFLINE=1" in text


# -- nothing listens wider than it must -------------------------------------------------

def test_redis_requires_the_password_and_every_url_carries_it():
    env = env_example()
    svc = load(COMPOSE)["services"]
    redis_cmd = svc["redis"]["command"]
    assert redis_cmd[redis_cmd.index("--requirepass") + 1] == env["REDIS_PASSWORD"]
    health = " ".join(svc["redis"]["healthcheck"]["test"])
    assert "REDISCLI_AUTH" in health and "PONG" in health  # a NOAUTH reply is unhealthy
    assert svc["redis"]["environment"]["REDIS_PASSWORD"] == env["REDIS_PASSWORD"]
    with_broker = {n for n, s in svc.items() if "MMQ_BROKER_URL" in (s.get("environment") or {})}
    assert {"api", "flower", "migrate", *WORKERS} <= with_broker
    for name in with_broker:
        url = svc[name]["environment"]["MMQ_BROKER_URL"]
        assert url == f"redis://:{env['REDIS_PASSWORD']}@redis:6379/0", name
    raw = COMPOSE.read_text()
    assert "redis://redis:" not in raw and "redis://:${REDIS_PASSWORD:?" in raw
    assert "ports" not in svc["redis"]  # the broker is for the compose network only


def test_no_worker_publishes_a_port():
    svc = load(COMPOSE)["services"]
    for doc in (svc, load(GPU)["services"]):
        for name in WORKERS:
            assert "ports" not in doc.get(name, {}), name
    assert {n for n, s in svc.items() if "ports" in s} == {"api", "flower", "prometheus",
                                                          "grafana"}
    # Prometheus has no login: it and Grafana are published on the host's loopback only.
    assert svc["prometheus"]["ports"] == ["127.0.0.1:9090:9090"]
    assert svc["grafana"]["ports"] == ["127.0.0.1:3000:3000"]
