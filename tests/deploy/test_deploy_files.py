"""Static checks of the deployment files: what CI can verify without a Docker engine."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "sfmp.json"
# Keys are test ids; not "gpu", which conftest treats as the gpu marker and skips.
DOCKERFILES = {"nvidia": (ROOT / "Dockerfile", "cuda"), "cpu": (DEPLOY / "Dockerfile.cpu", "cpu")}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n(\s*#.*\n)*", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def dashboard_exprs() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p.get("targets", [])]


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_installs_with_install_sh(kind):
    path, variant = DOCKERFILES[kind]
    ins = instructions(path)
    runs = [args for word, args in ins if word == "RUN"]
    # The image must install through the script CI runs, with the variant for its hardware.
    assert any(re.search(rf"scripts/install\.sh {variant}\b", r) for r in runs), runs
    assert not any("pip install" in r for r in runs), "install steps belong in install.sh"
    base = next(args for word, args in ins if word == "FROM")
    assert ":" in base and not base.endswith(":latest"), f"unpinned base image {base}"
    if kind == "nvidia":
        assert base == "vllm/vllm-openai:v0.32.0"
    user = [args for word, args in ins if word == "USER"]
    assert user and user[-1] not in ("root", "0"), "the server must not run as root"
    health = " ".join(args for word, args in ins if word == "HEALTHCHECK")
    assert "/health" in health
    # `sfmp serve` adds --quantization sfmp (and rejects it from the user), so CMD must not.
    # --verbose: vLLM's log goes to stdout (docker logs), not to a file in the container.
    assert json.loads(dict(ins)["ENTRYPOINT"]) == ["sfmp", "serve", "--verbose"]
    cmd = json.loads(dict(ins)["CMD"])
    assert cmd[0] == "/models/model" and "--quantization" not in cmd and "--host" in cmd
    for word, args in ins:
        if word in ("ENV", "ARG"):
            assert not re.search(r"(TOKEN|SECRET|PASSWORD|API_KEY)", args, re.I), args
        if word == "COPY":
            for src in args.split()[:-1]:
                assert (ROOT / src).exists(), f"{path.name} copies missing {src}"


def test_install_sh_system_mode_documented():
    text = (ROOT / "scripts" / "install.sh").read_text()
    assert 'if [ "$venv" = system ]' in text
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "install.sh")], check=True)


@pytest.fixture(scope="module")
def compose(tmp_path_factory) -> dict:
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose not installed (Debian package docker-compose)")
    model = tmp_path_factory.mktemp("model")
    proc = subprocess.run(
        ["docker-compose", "-f", str(DEPLOY / "docker-compose.yml"), "--profile", "gpu", "config"],
        capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "SFMP_MODEL_DIR": str(model)})
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


def test_compose_validates_and_binds_loopback(compose):
    services = compose["services"]
    assert {"sfmp", "sfmp-gpu", "gateway", "prometheus", "grafana"} <= set(services)
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    for name in ("sfmp", "sfmp-gpu"):
        svc = services[name]
        assert "ports" not in svc, "servers are reached through the gateway"
        assert any(v.endswith(":/models/model:ro") for v in svc["volumes"]), svc["volumes"]
        assert "sfmp-server" in svc["networks"]["default"]["aliases"]
        assert svc["command"][0] == "/models/model" and "--quantization" not in svc["command"]
    gpu = services["sfmp-gpu"]
    assert gpu["profiles"] == ["gpu"]
    device = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert "prometheus-data" in compose["volumes"] and "grafana-data" in compose["volumes"]


def test_compose_mounts_exist_and_match_provisioning(compose):
    services = compose["services"]
    for name in ("gateway", "prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            host = volume.split(":")[0]
            if host.startswith("/"):
                assert Path(host).exists(), f"{name} mounts missing {host}"
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/sfmp.yml").read_text())
    dash_dir = provider["providers"][0]["options"]["path"]
    assert any(v.split(":")[1] == dash_dir for v in services["grafana"]["volumes"])


def test_prometheus_config_passes_promtool():
    if shutil.which("promtool") is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    proc = subprocess.run(["promtool", "check", "config", str(DEPLOY / "prometheus/prometheus.yml")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    config = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    job = config["scrape_configs"][0]
    assert job["dns_sd_configs"][0]["names"] == ["sfmp-server"]


def test_dashboard_queries_parse_and_use_provisioned_datasource(tmp_path):
    exprs = dashboard_exprs()
    assert len(exprs) >= 20
    datasource = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    panels = json.loads(DASHBOARD.read_text())["panels"]
    for panel in panels:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
            assert panel["targets"], panel["title"]
    names = set(re.findall(r"\b(?:vllm:[a-z_:]+|sfmp_[a-z_]+)", " ".join(exprs)))
    for required in ("sfmp_model_avg_bits", "sfmp_model_bits_per_weight",
                     "sfmp_quantized_weight_bytes", "sfmp_op_calls_total", "sfmp_op_seconds_sum",
                     "vllm:generation_tokens_total", "vllm:kv_cache_usage_perc"):
        assert required in names
    if shutil.which("promtool") is None:
        pytest.skip("promtool not installed: PromQL syntax not checked")
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:expr_{i}", "expr": e} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    proc = subprocess.run(["promtool", "check", "rules", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
