"""Shared fixtures. Prefect is configured here, before anything imports it, so tests never touch
the user's ~/.prefect and never try to send telemetry."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

_PREFECT_HOME = Path(tempfile.mkdtemp(prefix="netrt-test-prefect-"))
os.environ.update(
    {
        "PREFECT_HOME": str(_PREFECT_HOME),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    }
)
os.environ.pop("PREFECT_API_URL", None)
for _key in [k for k in os.environ if k.startswith("NETRT_")]:
    del os.environ[_key]

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
IN_CI = os.environ.get("CI", "").lower() == "true"


def require_tool(name: str) -> str:
    """Path of an external program a test needs (dcmtk, dicom3tools, Orthanc, ...).

    Missing locally: the test is skipped with the reason. Missing in CI: the test fails, because
    .ci/run installs every such tool and a skip there would hide a broken install step.
    """
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (Debian packages: see .ci/run)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


def segimage2itkimage() -> str:
    """dcmqi's SEG reader: installed into the venv by the dev group (PyPI ``dcmqi``)."""
    local = Path(sys.executable).parent / "segimage2itkimage"
    if local.exists():
        return str(local)
    found = shutil.which("segimage2itkimage")
    if found is None:
        message = "dcmqi's segimage2itkimage is not installed (dev group of pyproject.toml)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return found


def dciodvfy_errors(path: Path) -> list[str]:
    """The Error lines dicom3tools' dciodvfy prints for the file at ``path`` (warnings are not errors)."""
    tool = require_tool("dciodvfy")
    result = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


def require_shared(relative: str) -> Path:
    """A folder of ../shared/data; skipped with a reason when absent (failed in CI)."""
    path = SHARED_DATA / relative
    if not path.exists():
        message = f"{path} is absent (../shared/data sits beside the repo in CI)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def mounted_tmpfs(mount_point: Path, size: str | int) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``mount_point`` for the block (needs root; skips the test with
    the reason otherwise): a real small disk, or another file system than the temp dir's."""
    mount_point.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (root needed): {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False, capture_output=True)


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One temporary Prefect server (SQLite) for every flow test in the session (~8 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module", autouse=True)
def _stop_background_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """After each test file, stop the background Prefect servers its `netrt process` runs left
    under this worker's temp dirs: each holds ~230 MB and the port of its data dir's config."""
    yield
    from flows.local_server import read_record, stop_background_server

    for path in tmp_path_factory.getbasetemp().rglob("local-server.json"):
        record = read_record(path.parent)
        if record is not None:
            stop_background_server(record)


# Test files that take minutes, started first: `./dev test` hands whole files to two workers in
# collection order, so a long file collected last would run alone at the end while a core idles.
LONGEST_FIRST = (
    "test_scale.py",
    "test_bench.py",
    "test_serve.py",
    "test_hardening_network.py",
    "test_hardening_corpus.py",
    "test_send.py",
    "test_process.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the tests of one file stay together and in order
