"""The config model: defaults, YAML, environment overrides, errors that name the key, docs in step."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any, get_args, get_origin

import pytest
import yaml
from pydantic import BaseModel

from netrt.config import DicomDestination, FolderDestination, NetrtConfig, dump_config, load_config
from netrt.errors import ConfigError

from .conftest import REPO

NETRT = [sys.executable, "-m", "netrt"]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "netrt.yaml"
    path.write_text(text)
    return path


def test_defaults_match_the_documented_contract() -> None:
    config = load_config()
    assert config.paths.data_dir == Path("./netrt-data")
    assert (config.listener.host, config.listener.port, config.listener.ae_title) == ("0.0.0.0", 11112, "NETRT")
    assert config.listener.study_idle_seconds == 30
    assert config.listener.tls.enabled is False
    assert (config.anonymization.enabled, config.anonymization.mode) == (True, "partial")
    assert config.anonymization.partial_tags == ["AccessionNumber", "PatientID"]
    assert config.processing.ignore_rois == ["*skull*", "*patient_outline*"]
    assert config.processing.planes == ["axial", "coronal", "sagittal"]
    assert config.prefect.api_url is None and config.prefect.server_port == 4200
    assert config.quarantine.retry_cron == "*/30 * * * *" and config.quarantine.max_attempts == 5
    (only,) = config.effective_destinations()
    assert isinstance(only, FolderDestination) and only.path == Path("./netrt-data/output")


def test_example_file_has_every_contract_key_and_loads() -> None:
    config = load_config(REPO / "netrt.example.yaml")
    archive, pacs = config.destinations
    assert isinstance(archive, FolderDestination) and archive.path == Path("./netrt-data/output")
    assert isinstance(pacs, DicomDestination)
    assert (pacs.ae_title, pacs.host, pacs.port, pacs.retries, pacs.retry_delay_seconds) == (
        "PACS",
        "127.0.0.1",
        4242,
        3,
        10,
    )


@pytest.mark.parametrize(
    ("text", "key", "why"),
    [
        ("listener: {port: abc}", "listener.port", "not a valid integer"),
        ("listener: {port: 70000}", "listener.port", "less than or equal to 65535"),
        ("listener: {bogus: 1}", "listener.bogus", "unknown key"),
        ("nonsense: 1", "nonsense", "unknown key"),
        ("anonymization: {mode: half}", "anonymization.mode", "'partial' or 'full'"),
        ("anonymization: {partial_tags: [PatientID, NotATag]}", "anonymization.partial_tags", "NotATag"),
        ("processing: {planes: [axial, oblique]}", "processing.planes[1]", "'axial', 'coronal' or 'sagittal'"),
        ("listener: {allowed_networks: [10.0.0.0/33]}", "listener.allowed_networks[0]", "network"),
        ("listener: {ae_title: THIS_TITLE_IS_FAR_TOO_LONG}", "listener.ae_title", "1-16"),
        ("listener: {tls: {enabled: true}}", "listener.tls", "certfile and keyfile"),
        ("destinations: [{name: p, type: dicom, host: h, port: 1}]", "destinations[0].ae_title", "missing"),
        ("destinations: [{name: p, type: ftp}]", "destinations[0]", "tag 'ftp'"),
        (
            "destinations: [{name: a, type: folder, path: x}, {name: a, type: folder, path: y}]",
            "destinations",
            "unique",
        ),
        ("quarantine: {retry_cron: '*/5 *'}", "quarantine.retry_cron", "five fields"),
    ],
)
def test_bad_files_name_the_key_and_the_reason(tmp_path: Path, text: str, key: str, why: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert any(path == key and why in reason for path, reason in caught.value.problems), caught.value.problems
    assert key in str(caught.value)


def test_not_yaml_and_not_a_mapping_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "listener: {port: [}"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "listener: {port: 2000, ae_title: FILEAE}")
    monkeypatch.setenv("NETRT_LISTENER__PORT", "3000")
    monkeypatch.setenv("NETRT_PROCESSING__PLANES", '["axial"]')
    config = load_config(path)
    assert config.listener.port == 3000
    assert config.listener.ae_title == "FILEAE"
    assert config.processing.planes == ["axial"]
    monkeypatch.setenv("NETRT_LISTENER__PORT", "nope")
    with pytest.raises(ConfigError, match=r"listener\.port: not a valid integer[\s\S]*NETRT_LISTENER__PORT"):
        load_config(path)


def test_show_output_round_trips(tmp_path: Path) -> None:
    config = load_config(REPO / "netrt.example.yaml")
    again = load_config(write(tmp_path, dump_config(config)))
    assert again == config


def test_cli_check_and_show(tmp_path: Path) -> None:
    good = subprocess.run([*NETRT, "config", "check", str(REPO / "netrt.example.yaml")], capture_output=True, text=True)
    assert good.returncode == 0, good.stderr
    bad_file = write(tmp_path, "listener: {port: abc, extra_key: 1}\n")
    bad = subprocess.run([*NETRT, "config", "check", str(bad_file)], capture_output=True, text=True)
    assert bad.returncode == 1
    assert "listener.port: not a valid integer" in bad.stderr
    assert "listener.extra_key: unknown key" in bad.stderr
    show = subprocess.run([*NETRT, "config", "show"], capture_output=True, text=True, check=True)
    assert yaml.safe_load(show.stdout)["listener"]["port"] == 11112


def _key_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every leaf key path of the model, e.g. `listener.tls.certfile`, `destinations[].retries`."""
    paths = []
    for name, field in model.model_fields.items():
        annotation: Any = field.annotation
        path = f"{prefix}{field.alias or name}"  # the key users write
        args = get_args(annotation)
        if get_origin(annotation) is list and args and get_args(args[0]):
            members = [m for m in get_args(get_args(args[0])[0]) if isinstance(m, type) and issubclass(m, BaseModel)]
            for member in members:
                paths += _key_paths(member, f"{path}[].")
            if members:
                continue
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            paths += _key_paths(annotation, f"{path}.")
        else:
            paths.append(path)
    return paths


def test_configuration_md_documents_every_key() -> None:
    documented = set(
        re.findall(r"`([a-z_]+(?:\[\])?(?:\.[a-z_]+(?:\[\])?)*)`", (REPO / "CONFIGURATION.md").read_text())
    )
    keys = _key_paths(NetrtConfig)
    assert len(keys) > 30  # the walk itself found the model's leaves
    missing = [k for k in keys if k not in documented]
    assert not missing, f"CONFIGURATION.md lacks: {missing}"


def test_output_kinds_and_routing(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("processing: {burn_in: true, outputs: [seg, overlay]}\n")
    assert load_config(path).processing.output_kinds() == ["overlay", "burn_in", "seg"]
    path.write_text(
        "processing: {outputs: [overlay]}\n"
        "destinations:\n  - {name: a, type: folder, path: /tmp/a, outputs: [overlay, color]}\n"
    )
    with pytest.raises(ConfigError, match=r"destinations\[0\]\.outputs: color not made"):
        load_config(path)
    path.write_text("destinations:\n  - {name: a, type: folder, path: /tmp/a, outputs: [source, overlay]}\n")
    assert load_config(path).destinations[0].outputs == ["source", "overlay"]
    path.write_text("processing: {outputs: [overlay, smoke]}\n")
    with pytest.raises(ConfigError, match=r"processing\.outputs"):
        load_config(path)
