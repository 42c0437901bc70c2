"""`netrt serve` brings up a real local Prefect server with its UI under the data dir, and stops cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from flows.local_server import is_healthy

from .conftest import free_port

pytestmark = [pytest.mark.slow, pytest.mark.network]


def test_serve_starts_local_prefect_server_with_ui_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    data = tmp_path / "data"
    config = tmp_path / "netrt.yaml"
    config.write_text(f"paths: {{data_dir: {data}}}\nprefect: {{server_port: {port}}}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "netrt", "serve", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    lines: list[str] = []
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("NETRT is running"):
                break
        output = "".join(lines)
        assert f"Prefect UI: http://127.0.0.1:{port}" in output, output
        api = f"http://127.0.0.1:{port}/api"
        assert is_healthy(api)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as page:
            assert "<html" in page.read(4096).decode("utf-8", "replace").lower()
        assert (data / "prefect" / "prefect.db").exists(), "SQLite database is not under the data dir"
        assert (data / "logs" / "netrt.log").exists()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        assert not is_healthy(api, timeout=1.0), "the Prefect server outlived netrt serve"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
