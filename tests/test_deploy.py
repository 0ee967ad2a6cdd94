"""The deploy kit (issue 16), checked the way it can be on a machine without a container
engine or a cluster: the Dockerfile linted by hadolint, the compose file against the
Compose Specification's schema, the Kubernetes manifests against Kubernetes' schemas, the
systemd unit by systemd itself, the alert rules by Prometheus' promtool (with unit tests of
when each fires), and what the image runs, run outside it: its entry command with the
config from the environment, and the VM install script into a directory of its own."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import pytest
import yaml
from conftest import free_port, until_ready

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
VENV_BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    found = shutil.which(name, path=f"{VENV_BIN}:{os.environ.get('PATH', '')}")
    assert found is not None, f"{name} is not installed (tests/run installs it)"
    return found


# --- containers --------------------------------------------------------------------------------


def dockerfile_stages() -> list[list[str]]:
    """The Dockerfile's instructions (continuation lines joined), by stage."""
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    lines = [ln for ln in text.replace("\\\n", " ").splitlines() if ln and not ln.startswith("#")]
    stages: list[list[str]] = []
    for line in lines:
        if line.startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def test_the_dockerfile_passes_hadolint() -> None:
    dockerfile = DEPLOY / "docker" / "Dockerfile"
    result = subprocess.run(
        [tool("hadolint"), "--no-color", "--failure-threshold", "info", str(dockerfile)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_runs_as_a_user_without_build_tools_and_checks_healthz() -> None:
    build, final = dockerfile_stages()
    assert any("build-essential" in line for line in build)
    assert not any(re.search(r"build-essential|gcc|apt-get install", ln) for ln in final)
    user = [ln.split()[1] for ln in final if ln.startswith("USER ")]
    assert user and user[-1] not in ("root", "0")
    (healthcheck,) = [ln for ln in final if ln.startswith("HEALTHCHECK ")]
    assert "/healthz" in healthcheck
    assert any(ln.startswith("COPY --from=build ") for ln in final)


def test_the_compose_file_follows_the_compose_specification() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    schema = json.loads((ROOT / "tests" / "schemas" / "compose-spec.json").read_text())
    jsonschema.Draft7Validator(schema).validate(compose)
    services = compose["services"]
    assert {"gateway-a", "gateway-b", "redis", "postgres", "nginx", "coturn"} <= set(services)
    for name in ("gateway-a", "gateway-b"):
        env = services[name]["environment"]
        assert env["MEMBRANE_NODE_ID"] == name
        assert env["MEMBRANE_REDIS_URL"].startswith("redis://")
        assert env["MEMBRANE_HISTORY_URL"].startswith("postgresql://")
    # Redis keeps the live state on disk: AOF, from the shipped config.
    assert "./redis.conf:/usr/local/etc/redis/redis.conf:ro" in services["redis"]["volumes"]
    assert re.search(r"^appendonly yes$", (DEPLOY / "redis.conf").read_text(), re.M)
    # Every file a service mounts is in the repository.
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), source


# --- Kubernetes --------------------------------------------------------------------------------


def manifests() -> list[dict[str, Any]]:
    found = []
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        if path.name != "kustomization.yaml":
            found += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


def test_the_kubernetes_manifests_validate_against_kubernetes_schemas() -> None:
    files = [p for p in (DEPLOY / "kubernetes").glob("*.yaml") if p.name != "kustomization.yaml"]
    result = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "--kubernetes-version", "1.31", *map(str, files)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    kustomization = yaml.safe_load((DEPLOY / "kubernetes" / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in files)


def test_the_gateway_deployment_drains_probes_and_scales_on_sockets() -> None:
    by_kind = {(m["kind"], m["metadata"]["name"]): m for m in manifests()}
    deployment = by_kind[("Deployment", "membrane-gateway")]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    # Kubernetes kills the pod after the grace: the pause and the whole drain fit in it.
    assert pod["terminationGracePeriodSeconds"] > pre_stop + float(env["MEMBRANE_DRAIN_GRACE_S"])
    assert {"secretRef": {"name": "membrane-secrets"}} in container["envFrom"]
    secret = by_kind[("Secret", "membrane-secrets")]
    assert {"MEMBRANE_JWT_SECRET", "MEMBRANE_TWILIO_AUTH_TOKEN"} <= set(secret["stringData"])
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    hpa = by_kind[("HorizontalPodAutoscaler", "membrane-gateway")]
    metrics = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert metrics == ["membrane_sockets"]
    assert by_kind[("PodDisruptionBudget", "membrane-gateway")]["spec"]["minAvailable"] == 1
    ingress = by_kind[("Ingress", "membrane")]["metadata"]["annotations"]
    assert ingress["nginx.ingress.kubernetes.io/affinity"] == "cookie"
    assert int(ingress["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 60
    assert ("StatefulSet", "membrane-redis") in by_kind
    assert ("StatefulSet", "membrane-postgres") in by_kind


# --- one VM ------------------------------------------------------------------------------------


def test_the_systemd_unit_is_valid_and_hardened(tmp_path: Path) -> None:
    unit = (DEPLOY / "systemd" / "membrane.service").read_text()
    # systemd checks that the command exists: the one this checkout has stands in for it.
    local = tmp_path / "membrane.service"
    local.write_text(unit.replace("/opt/membrane/venv/bin/membrane", str(VENV_BIN / "membrane")))
    analyze = tool("systemd-analyze")
    verify = subprocess.run([analyze, "verify", str(local)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    security = subprocess.run(
        [analyze, "security", "--offline=yes", "--threshold=20", str(local)],
        capture_output=True,
        text=True,
    )
    assert security.returncode == 0, security.stdout + security.stderr
    exposure = re.search(r"Overall exposure level for membrane.service: ([\d.]+)", security.stdout)
    assert exposure is not None and float(exposure.group(1)) <= 2.0, security.stdout
    for setting in ("User=membrane", "NoNewPrivileges=yes", "ProtectSystem=strict"):
        assert re.search(rf"^{re.escape(setting)}$", unit, re.M), setting
    assert re.search(r"^Restart=on-failure$", unit, re.M)


# --- alerts ------------------------------------------------------------------------------------


def test_the_alert_rules_are_valid_and_fire_when_they_should() -> None:
    promtool = tool("promtool")
    rules = DEPLOY / "prometheus" / "alerts.yml"
    check = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    unit_tests = ROOT / "tests" / "alerts_test.yml"
    run = subprocess.run(
        [promtool, "test", "rules", str(unit_tests)], capture_output=True, text=True, cwd=ROOT
    )
    assert run.returncode == 0, run.stdout + run.stderr
    names = {r["alert"] for g in yaml.safe_load(rules.read_text())["groups"] for r in g["rules"]}
    tested = {
        a["alertname"]
        for t in yaml.safe_load(unit_tests.read_text())["tests"]
        for a in t["alert_rule_test"]
        if a["exp_alerts"]
    }
    assert names <= tested, names - tested


# --- what the image and the VM run, run here -----------------------------------------------


async def serve_until_sigterm(command: list[str], env: dict[str, str], port: int) -> list[str]:
    """Run a node's command, check it serves the API and the pages, SIGTERM it (a drain),
    and return its log lines once it has exited by itself."""
    proc = await asyncio.create_subprocess_exec(
        *command, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    url = f"http://127.0.0.1:{port}"
    try:
        await until_ready(url, proc, lambda: "the node exited")
        async with aiohttp.ClientSession() as http:
            for path, kind in (("/healthz", "application/json"), ("/agent/", "text/html")):
                async with http.get(url + path) as r:
                    assert r.status == 200 and r.content_type == kind, path
                    assert "script-src 'self'" in r.headers["Content-Security-Policy"]
            async with http.get(f"{url}/widget.js") as r:
                assert r.status == 200 and "attachShadow" in await r.text()
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    return err.decode().splitlines()


def node_env(tmp_path: Path, port: int, **more: str) -> dict[str, str]:
    return {
        "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "MEMBRANE_HOST": "127.0.0.1",
        "MEMBRANE_PORT": str(port),
        "MEMBRANE_DATA_DIR": str(tmp_path / "data"),
        "MEMBRANE_JWT_SECRET": "j" * 40,
        "MEMBRANE_NODE_ID": "deploy-test",
        "MEMBRANE_LOG_FORMAT": "json",
        **more,
    }


async def test_the_images_entry_command_runs_a_node_from_the_environment(tmp_path: Path) -> None:
    """deploy/docker/entrypoint as the image runs it: the example config at the path the
    environment names, the rest from MEMBRANE_* variables, JSON logs, a drain on SIGTERM."""
    port = free_port()
    env = node_env(
        tmp_path,
        port,
        MEMBRANE_CONFIG=str(DEPLOY / "membrane.example.toml"),
        MEMBRANE_WEB_CLIENT_DIR=str(ROOT / "web_client"),
    )
    lines = await serve_until_sigterm([str(DEPLOY / "docker" / "entrypoint")], env, port)
    records = [json.loads(line) for line in lines]  # every line one JSON object
    assert {r["node"] for r in records} == {"deploy-test"}
    assert any(r["logger"] == "gateway.services.drain" for r in records)
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)


async def run_install(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = [str(DEPLOY / "install.sh")]
    return await asyncio.to_thread(
        subprocess.run, command, env=env, capture_output=True, text=True, timeout=600
    )


# Two virtualenvs built from the lock, beside the rest of the suite: over 120 s on a slow
# machine of the CI's kind.
@pytest.mark.timeout(600)
async def test_the_vm_install_script_installs_a_node_that_serves(tmp_path: Path) -> None:
    """deploy/install.sh into a directory of its own (DESTDIR): a virtualenv from the lock,
    the web client, the config and a secret kept from the first install, the unit; then the
    unit's command, run as the unit would, serves the API and the pages."""
    dest = tmp_path / "root"
    env = {**os.environ, "DESTDIR": str(dest), "PYTHON": shutil.which("python3") or "python3"}
    install = await run_install(env)
    assert install.returncode == 0, install.stdout + install.stderr
    etc = dest / "etc" / "membrane"
    secret = (etc / "membrane.env").read_text()
    assert re.search(r"^MEMBRANE_JWT_SECRET=\S{32,}$", secret, re.M)
    assert (etc / "membrane.env").stat().st_mode & 0o077 == 0  # root's alone
    assert (dest / "etc" / "systemd" / "system" / "membrane.service").is_file()
    # Again (an upgrade): the config and the secret stay, a new virtualenv is swapped in.
    first_venv = (dest / "opt" / "membrane" / "venv").resolve()
    again = await run_install(env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert (etc / "membrane.env").read_text() == secret
    assert (dest / "opt" / "membrane" / "venv").resolve() != first_venv
    # The unit's command, with its environment, from the installed tree.
    unit = (DEPLOY / "systemd" / "membrane.service").read_text()
    unit_env = dict(re.findall(r"^Environment=(\w+)=(\S+)$", unit, re.M))
    assert unit_env["MEMBRANE_WEB_CLIENT_DIR"] == "/opt/membrane/web_client"
    port = free_port()
    env = node_env(
        tmp_path,
        port,
        MEMBRANE_WEB_CLIENT_DIR=str(dest / "opt" / "membrane" / "web_client"),
        MEMBRANE_LOG_FORMAT=unit_env["MEMBRANE_LOG_FORMAT"],
    )
    membrane = dest / "opt" / "membrane" / "venv" / "bin" / "membrane"
    command = [str(membrane), "serve", "--config", str(etc / "membrane.toml")]
    await serve_until_sigterm(command, env, port)
