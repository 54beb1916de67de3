"""docker-compose.yml and the Dockerfile, checked without a Docker engine: the
structure of every service, and that every command is a real entry point."""

import re
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from celery import Celery
from celery.app.utils import find_app
from typer.core import TyperGroup

from app.cli import app as cli_app
from models.settings import Settings
from workers.names import QUEUES

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
OUR_IMAGE = {name for name, service in SERVICES.items() if "build" in service}
SECRET_NAME = re.compile(r"PASSWORD|TOKEN|SECRET|AUTH", re.IGNORECASE)
REQUIRED_VARIABLE = re.compile(r"\$\{(\w+):\?[^}]*\}")


def rewardranker_context(args: list[str]) -> Any:
    """Parse `rewardranker ARGS` the way the installed script would, without
    running it: unknown commands, options or bad values raise (Typer's click)
    usage errors. Returns the leaf command's context, whose `params` are parsed."""
    command = typer.main.get_command(cli_app)
    names = ["rewardranker"]
    while isinstance(command, TyperGroup):
        sub = command.get_command(command.context_class(command), args[0])
        assert sub is not None, f"rewardranker {' '.join(names[1:])}: no command {args[0]!r}"
        names.append(args[0])
        command, args = sub, args[1:]
    return command.make_context(" ".join(names), list(args))


def test_services_are_the_distributed_deployment():
    assert set(SERVICES) == {
        "postgres",
        "redis",
        "migrate",
        "api",
        "worker-cpu",
        "worker-gpu",
        "flywheel",
        "beat",
        "flower",
    }
    assert set(SERVICES) - {"postgres", "redis"} == OUR_IMAGE
    for name in OUR_IMAGE:
        assert SERVICES[name]["build"]["dockerfile"] == "Dockerfile"
        assert SERVICES[name]["build"]["context"] == "."
        # The data root (models, the DVC repo) is one volume that all of them share.
        assert "flywheel-data:/data" in SERVICES[name]["volumes"]
        assert SERVICES[name]["environment"]["RR_DATA_DIR"] == "/data"


@pytest.mark.parametrize("name", ["postgres", "redis"])
def test_servers_have_healthchecks(name: str):
    check = SERVICES[name]["healthcheck"]
    assert check["test"][0] == "CMD"
    assert check["test"][1] == {"postgres": "pg_isready", "redis": "redis-cli"}[name]
    assert check["retries"] >= 3


def test_migrate_runs_once_after_postgres_is_healthy():
    migrate = SERVICES["migrate"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert rewardranker_context(migrate["command"][1:]).params == {"revision": "head"}


@pytest.mark.parametrize("name", ["api", "worker-cpu", "worker-gpu", "flywheel", "beat", "flower"])
def test_long_running_services_wait_for_the_schema_and_the_broker(name: str):
    depends = SERVICES[name]["depends_on"]
    assert depends["migrate"] == {"condition": "service_completed_successfully"}
    assert depends["redis"] == {"condition": "service_healthy"}
    assert SERVICES[name]["restart"] == "unless-stopped"


def test_every_rewardranker_command_parses():
    for name in OUR_IMAGE:
        command = SERVICES[name]["command"]
        if command[0] == "rewardranker":
            rewardranker_context(command[1:])  # raises on an unknown command or option


def test_api_binds_beyond_loopback_and_requires_a_token():
    api = SERVICES["api"]
    params = rewardranker_context(api["command"][1:]).params
    assert params["host"] == "0.0.0.0" and params["port"] == 8000
    assert REQUIRED_VARIABLE.fullmatch(api["environment"]["RR_API_TOKEN"]).group(1) == (
        "RR_API_TOKEN"
    )
    assert api["ports"] == ["8000:8000"]
    assert "/health" in " ".join(api["healthcheck"]["test"])


def test_worker_pools_split_the_queues_between_cpu_and_gpu():
    queues = {
        name: set(rewardranker_context(SERVICES[name]["command"][1:]).params["queues"].split(","))
        for name in ("worker-cpu", "worker-gpu")
    }
    assert queues == {
        "worker-cpu": {"execution", "labeling"},
        "worker-gpu": {"generation", "training"},
    }
    assert queues["worker-cpu"] | queues["worker-gpu"] == set(QUEUES)


def test_gpu_pool_reserves_a_gpu_and_installs_the_gpu_extra():
    gpu = SERVICES["worker-gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"]
    assert device["driver"] == "nvidia" and device["count"] >= 1
    assert gpu["build"]["args"] == {"EXTRAS": "gpu"}
    # CUDA does not survive a fork: the GPU worker must not use the prefork pool.
    assert rewardranker_context(gpu["command"][1:]).params["pool"] == "solo"
    assert "cpu" not in gpu["image"]
    assert "deploy" not in SERVICES["worker-cpu"]


def test_flywheel_driver_uses_the_pools_instead_of_starting_workers():
    params = rewardranker_context(SERVICES["flywheel"]["command"][1:]).params
    assert params["continuous"] is True
    assert params["start_workers"] is False


def test_beat_schedules_the_reconcile_that_a_cpu_pool_consumes():
    from workers.celery_app import celery
    from workers.names import MAINTENANCE, RECONCILE

    assert rewardranker_context(SERVICES["beat"]["command"][1:]).info_name.endswith("beat")
    schedule = celery.conf.beat_schedule["reconcile"]
    assert schedule["task"] == RECONCILE
    assert celery.amqp.router.route({}, RECONCILE)["queue"].name == MAINTENANCE
    # The CPU pool takes it: `rewardranker worker` adds the maintenance queue to
    # any worker that does not train.
    assert "training" not in SERVICES["worker-cpu"]["command"][3]


def test_flower_names_the_project_celery_app():
    command = SERVICES["flower"]["command"]
    assert command[:4] == ["celery", "-A", "workers.celery_app", "flower"]
    # What `celery -A workers.celery_app` itself does to find the app.
    assert isinstance(find_app(command[2]), Celery)
    assert "flower==" in (ROOT / "Dockerfile").read_text()
    assert REQUIRED_VARIABLE.fullmatch(SERVICES["flower"]["environment"]["FLOWER_BASIC_AUTH"])


def test_no_secret_has_a_default():
    for name, service in SERVICES.items():
        for key, value in service.get("environment", {}).items():
            if SECRET_NAME.search(key):
                assert REQUIRED_VARIABLE.fullmatch(value), f"{name}: {key} must be ${{{key}:?...}}"
    database_url = SERVICES["api"]["environment"]["RR_DATABASE_URL"]
    (password,) = REQUIRED_VARIABLE.findall(database_url)
    assert password == "POSTGRES_PASSWORD"
    assert REQUIRED_VARIABLE.fullmatch(SERVICES["postgres"]["environment"]["POSTGRES_PASSWORD"])


def test_environment_names_real_settings():
    fields = {f"RR_{name.upper()}" for name in Settings.model_fields}
    for name in OUR_IMAGE:
        for key in SERVICES[name]["environment"]:
            assert key in fields or key.startswith("FLOWER_"), f"{name}: {key} is no setting"


def test_dockerfile_installs_the_project_on_the_agreed_base():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert dockerfile.startswith("#") and "FROM python:3.11-slim-bookworm\n" in dockerfile
    steps = [
        "scripts/setup-system.sh",
        "pip install torch==2.13.0",
        'pip install ".${EXTRAS:+[$EXTRAS]}"',
    ]
    positions = [dockerfile.index(step) for step in steps]
    assert positions == sorted(positions)  # system, then torch, then the project
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "var", ".env"} <= set(ignored)
