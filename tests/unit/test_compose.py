"""docker-compose.yml and the Dockerfile, checked without a Docker engine: the topology the
operations manual describes, settings Marquee knows, pinned images, health checks, and an
image that holds every package and runs the entry points the README names."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

from core.config import Settings

ROOT = Path(__file__).resolve().parents[2]
TOPOLOGY = {"postgres", "temporal", "temporal-ui", "clickhouse", "jaeger", "migrate", "api", "proxy", "worker"}
ONE_SHOT = {"migrate"}  # runs and exits: nothing to health-check


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return dict(compose["services"])


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(key): str(value) for key, value in env.items()}


def test_the_production_topology_is_all_there(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) >= TOPOLOGY
    temporal = _environment(services["temporal"])
    assert temporal["DB"].startswith("postgres")
    assert temporal["POSTGRES_SEEDS"] == "postgres"
    assert services["api"]["deploy"]["replicas"] == 2
    assert "ports" not in services["api"], "the replicas are reached through the proxy only"
    worker = services["worker"]
    # `--scale worker=N` needs no fixed name and no host port.
    assert "container_name" not in worker
    assert "ports" not in worker
    grace = float(_environment(worker)["MARQUEE_WORKER_SHUTDOWN_SECONDS"])
    assert float(worker["stop_grace_period"].rstrip("s")) > grace


def test_every_marquee_variable_is_a_setting(services: dict[str, dict[str, Any]]) -> None:
    known = {f"MARQUEE_{name.upper()}" for name in Settings.model_fields}
    unknown = {
        (name, variable)
        for name, service in services.items()
        for variable in _environment(service)
        if variable.startswith("MARQUEE_") and variable not in known
    }
    assert unknown == set()


def test_images_are_pinned(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        if "image" not in service:
            assert "build" in service, name
            continue
        image, _, tag = str(service["image"]).rpartition(":")
        assert image, f"{name}: {service['image']} has no tag"
        assert "/" not in tag, f"{name}: {service['image']} has no tag"
        assert tag != "latest", f"{name}: {service['image']}"
        assert re.search(r"\d", tag), f"{name}: {service['image']} is not a version"
    dockerfile = (ROOT / "Dockerfile").read_text()
    bases = re.findall(r"^FROM\s+(\S+)", dockerfile, flags=re.MULTILINE)
    assert bases
    assert all(re.search(r":\S*\d", base) for base in bases), bases


def test_long_running_services_have_health_checks(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        if name in ONE_SHOT:
            continue
        check = service.get("healthcheck") or {}
        assert check.get("test"), f"{name} has no health check"
        assert not check.get("disable"), f"{name}'s health check is disabled"


def test_started_after_what_they_need(services: dict[str, dict[str, Any]]) -> None:
    for name in ("api", "worker"):
        needs = services[name]["depends_on"]
        assert needs["migrate"]["condition"] == "service_completed_successfully"
        assert needs["temporal"]["condition"] == "service_healthy"
    assert services["proxy"]["depends_on"]["api"]["condition"] == "service_healthy"


def test_the_proxy_config_is_in_the_repository(services: dict[str, dict[str, Any]]) -> None:
    [mount] = services["proxy"]["volumes"]
    source = ROOT / mount.split(":")[0]
    assert source.is_file()
    assert "http://api:8000" in source.read_text()


def test_the_image_runs_the_entry_points_the_readme_names(services: dict[str, dict[str, Any]]) -> None:
    readme = (ROOT / "README.md").read_text()
    dockerfile = (ROOT / "Dockerfile").read_text()
    [cmd] = re.findall(r"^CMD\s+(\[.*\])", dockerfile, flags=re.MULTILINE)
    assert not re.search(r"^ENTRYPOINT", dockerfile, flags=re.MULTILINE)  # the commands below run as given
    commands = [yaml.safe_load(cmd), *(service["command"] for service in services.values() if "build" in service)]
    for command in commands:
        program = " ".join(command[:2])
        assert program in {"marquee api", "marquee worker", "marquee migrate"}, command
        assert f"{program}" in readme, f"README does not name `{program}`"
    assert {" ".join(command[:2]) for command in commands} >= {"marquee api", "marquee worker"}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["marquee"] == "entrypoints.cli:main"


def test_the_image_holds_every_package(services: dict[str, dict[str, Any]]) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    copied = {shlex.split(line)[1] for line in re.findall(r"^COPY\s+.*$", dockerfile, flags=re.MULTILINE)}
    copied |= {name for line in re.findall(r"^COPY\s+(.*)\s+\./$", dockerfile, flags=re.MULTILINE)
               for name in line.split()}  # fmt: skip
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {pattern.rstrip("*") for pattern in setuptools["packages"]["find"]["include"]}
    modules = {f"{module}.py" for module in setuptools["py-modules"]}
    assert packages | modules <= copied
