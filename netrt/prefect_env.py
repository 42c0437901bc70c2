"""The Prefect settings NETRT runs with, as environment variables.

Prefect reads its settings from the environment; NETRT computes them from its own config so a
user never has to: the local server's SQLite database and home under the data dir, results
persisted under the data dir (the cache), and analytics off (these machines have no internet and
Prefect would otherwise log connection errors).
This module only builds a mapping; it does not import Prefect.
"""

from __future__ import annotations

from netrt.config import NetrtConfig
from netrt.layout import DataLayout

LOCAL_HOST = "127.0.0.1"


def local_api_url(config: NetrtConfig) -> str:
    return f"http://{LOCAL_HOST}:{config.prefect.server_port}/api"


def api_url(config: NetrtConfig) -> str:
    """The API flows talk to: the configured one, or NETRT's own local server."""
    return config.prefect.api_url or local_api_url(config)


def prefect_environment(config: NetrtConfig, *, with_api_url: bool = True) -> dict[str, str]:
    """Environment variables for Prefect processes and clients started by NETRT.

    ``with_api_url`` False leaves PREFECT_API_URL unset, which makes Prefect run flows against a
    temporary (ephemeral) server: used by one-shot commands when no server is configured.
    """
    layout = DataLayout.from_data_dir(config.paths.data_dir)
    env = {
        "PREFECT_HOME": str(layout.prefect_home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{layout.prefect_home / 'prefect.db'}",
        "PREFECT_SERVER_API_HOST": LOCAL_HOST,
        "PREFECT_SERVER_API_PORT": str(config.prefect.server_port),
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        "PREFECT_LOCAL_STORAGE_PATH": str(layout.cache / "results"),
        "PREFECT_UI_API_URL": api_url(config),
        # A temporary server (one-shot commands) may take longer than Prefect's 20 s to come up on a
        # busy machine; the wait ends as soon as it answers.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    }
    if with_api_url:
        env["PREFECT_API_URL"] = api_url(config)
    return env
