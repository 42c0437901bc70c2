"""NETRT's one configuration model, loaded from YAML and overridable from the environment.

Why one validated model: users edit YAML by hand next to a clinical system; a typo must stop
NETRT at start with the key path named (``listener.port: not a valid integer``), never run with a
silently ignored setting. Unknown keys are therefore errors, and every field has a type, a default
and a description (CONFIGURATION.md documents each one; a test keeps the two in step).

Environment variables override the file: ``NETRT_LISTENER__PORT=11113`` sets ``listener.port``
(prefix ``NETRT_``, nested keys joined by ``__``; lists and objects as JSON).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, IPvAnyNetwork, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from netrt.errors import ConfigError

ENV_PREFIX = "NETRT_"
ENV_NESTED_DELIMITER = "__"

# DICOM AE titles: 1-16 characters of the default character repertoire, no backslash, not all
# spaces (PS3.5 6.2); leading/trailing spaces are not significant.
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")


def _check_ae_title(value: str) -> str:
    stripped = value.strip()
    if not stripped or not _AE_TITLE.match(value):
        raise ValueError("an AE title is 1-16 printable ASCII characters, no backslash, not blank")
    return stripped


class _Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PathsConfig(_Section):
    data_dir: Path = Field(
        default=Path("./netrt-data"),
        description="Root of everything NETRT stores: incoming/, studies/, quarantine/, logs/, "
        "output/, cache and the local Prefect database. Relative paths are taken from the "
        "directory NETRT is started in.",
    )


class TlsConfig(_Section):
    enabled: bool = Field(default=False, description="Accept DICOM associations over TLS only.")
    certfile: Path | None = Field(default=None, description="PEM certificate of this node (required with TLS).")
    keyfile: Path | None = Field(default=None, description="PEM private key of `certfile` (required with TLS).")
    ca_file: Path | None = Field(
        default=None,
        description="PEM bundle of CAs; when set, peers must present a client certificate signed by one.",
    )

    @model_validator(mode="after")
    def _cert_and_key_when_enabled(self) -> TlsConfig:
        if self.enabled and (self.certfile is None or self.keyfile is None):
            raise ValueError("TLS is enabled: certfile and keyfile are both required")
        return self


class ListenerConfig(_Section):
    host: str = Field(default="0.0.0.0", description="Address the DICOM listener binds to.")
    port: int = Field(default=11112, ge=1, le=65535, description="TCP port of the DICOM listener.")
    ae_title: str = Field(default="NETRT", description="AE title NETRT answers to (called AE).")
    study_idle_seconds: float = Field(
        default=30,
        gt=0,
        description="A study is complete when nothing of it has arrived for this many seconds "
        "and no association is still sending it.",
    )
    allowed_calling_ae_titles: list[str] = Field(
        default_factory=list,
        description="Calling AE titles allowed to associate; empty allows any.",
    )
    allowed_networks: list[IPvAnyNetwork] = Field(
        default_factory=list,
        description="Source networks (CIDR, e.g. 10.0.0.0/8) allowed to associate; empty allows any.",
    )
    max_associations: int = Field(
        default=10, ge=1, description="Concurrent associations accepted; more are rejected (busy)."
    )
    max_pdu_size: int = Field(
        default=0,
        ge=0,
        description="Maximum PDU size offered to peers in bytes; 0 means unlimited (fastest).",
    )
    max_dataset_bytes: int = Field(
        default=1 << 30,
        ge=1024,
        description="Largest data set one C-STORE may carry; a larger one is answered 0xA700 and not kept. "
        "PDUs longer than max_pdu_size (or, when that is 0, this) plus 1 MiB close the connection unread.",
    )
    tls: TlsConfig = Field(default_factory=TlsConfig, description="Optional TLS for incoming associations.")

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: _check_ae_title(v)))

    @field_validator("allowed_calling_ae_titles")
    @classmethod
    def _check_allowed_titles(cls, values: list[str]) -> list[str]:
        return [_check_ae_title(v) for v in values]


class AnonymizationConfig(_Section):
    enabled: bool = Field(default=True, description="Anonymize studies before anything is written out.")
    mode: Literal["partial", "full"] = Field(
        default="partial",
        description="`partial`: blank only `partial_tags`; `full`: DICOM PS3.15 Annex E basic profile.",
    )
    partial_tags: list[str] = Field(
        default_factory=lambda: ["AccessionNumber", "PatientID"],
        description="DICOM keywords emptied (Type 2) or removed (Type 3) in partial mode.",
    )
    pseudonym_prefix: str = Field(
        default="ANON-",
        pattern=r"^[A-Za-z0-9._-]{0,32}$",
        description="Full mode: PatientID and PatientName become this prefix plus 16 hex digits of a keyed hash "
        "of the patient's identity (letters, digits, '.', '_', '-'; at most 32 characters).",
    )
    secret_file: Path | None = Field(
        default=None,
        description="Full mode: file with the secret key of pseudonyms, UID mapping and date shifts; null: "
        "<data_dir>/secret.key, created (mode 0600) on first use. Same secret -> same pseudonyms and UIDs.",
    )
    mapping_file: Path | None = Field(
        default=None,
        description="Full mode: re-identification file (JSON lines, original patient and study -> pseudonym and "
        "new StudyInstanceUID), owner-only (0600); null: none is written.",
    )
    retain_longitudinal_modified_dates: bool = Field(
        default=False,
        description="Full mode: shift dates by one keyed number of days per patient instead of removing them "
        "(PS3.15 Retain Longitudinal Temporal Information with Modified Dates Option).",
    )
    max_date_shift_days: int = Field(
        default=3650,
        ge=1,
        le=36500,
        description="Full mode with modified dates: dates move back by 1 to this many days (same shift per patient).",
    )
    retain_patient_characteristics: bool = Field(
        default=False,
        description="Full mode: keep sex, age, size, weight and the like (Retain Patient Characteristics Option).",
    )
    retain_device_identity: bool = Field(
        default=False,
        description="Full mode: keep station names, serial numbers, device IDs (Retain Device Identity Option).",
    )
    retain_institution_identity: bool = Field(
        default=False,
        description="Full mode: keep institution name, address, department (Retain Institution Identity Option).",
    )
    clean_descriptors: bool = Field(
        default=True,
        description="Full mode: keep descriptions and labels (ROI names included) with the patient's names, IDs "
        "and dates removed from them (Clean Descriptors Option); false: they are emptied or removed.",
    )
    safe_private_tags: list[str] = Field(
        default_factory=list,
        description="Full mode: private attributes kept, as 'GGGG,xxEE,PRIVATE CREATOR' (odd group, element byte); "
        "all other private attributes are removed (Retain Safe Private Option when not empty).",
    )

    @field_validator("partial_tags")
    @classmethod
    def _known_keywords(cls, values: list[str]) -> list[str]:
        from pydicom.datadict import tag_for_keyword

        unknown = [v for v in values if tag_for_keyword(v) is None]
        if unknown:
            raise ValueError(f"not DICOM keywords: {', '.join(unknown)}")
        return values

    @field_validator("safe_private_tags")
    @classmethod
    def _private_tag_form(cls, values: list[str]) -> list[str]:
        pattern = re.compile(r"^([0-9A-Fa-f]{4}),xx([0-9A-Fa-f]{2}),(.+)$")
        bad = []
        for value in values:
            match = pattern.match(value)
            if match is None or int(match.group(1), 16) % 2 == 0 or not match.group(3).strip():
                bad.append(value)
        if bad:
            raise ValueError(f"not 'GGGG,xxEE,PRIVATE CREATOR' with an odd group: {', '.join(bad)}")
        return values


Plane = Literal["axial", "coronal", "sagittal"]
#: Derived outputs NETRT can make for a study (``processing.outputs``).
OutputKind = Literal["overlay", "burn_in", "seg", "color"]
#: What a destination can be sent (``destinations[].outputs``): the derived kinds, and ``source``,
#: the received study itself, anonymized as configured.
RoutedKind = Literal["overlay", "burn_in", "seg", "color", "source"]
DEFAULT_DISCLAIMER = "FOR RESEARCH USE ONLY - NOT FOR CLINICAL USE"


def _all_planes() -> list[Plane]:
    return ["axial", "coronal", "sagittal"]


def _default_outputs() -> list[OutputKind]:
    return ["overlay"]


class ProcessingConfig(_Section):
    include_rois: list[str] = Field(
        default_factory=list,
        description="Case-insensitive glob patterns of ROI names to keep; empty keeps all.",
    )
    ignore_rois: list[str] = Field(
        default_factory=lambda: ["*skull*", "*patient_outline*"],
        description="Case-insensitive glob patterns of ROI names to drop (applied after include_rois).",
    )
    planes: list[Plane] = Field(
        default_factory=_all_planes,
        min_length=1,
        description="Overlay series written per study, one per plane.",
    )
    burn_in: bool = Field(
        default=False,
        description="Also write, per plane, a series with the mask outline burned into the pixels (the same as "
        "adding `burn_in` to `outputs`).",
    )
    outputs: list[OutputKind] = Field(
        default_factory=_default_outputs,
        min_length=1,
        description="Derived outputs per study: `overlay` (series per plane with the mask in Overlay Plane "
        "groups), `burn_in` (series per plane with the outlines burned into the pixels), `seg` (one DICOM "
        "Segmentation, a segment per kept ROI), `color` (RGB Secondary Capture series per plane with each ROI "
        "outlined in its colour, a legend and the disclaimer).",
    )
    overlay_groups: Literal["merged", "per_roi"] = Field(
        default="merged",
        description="`merged`: one overlay group (6000) with every kept ROI; `per_roi`: one group per kept ROI "
        "(6000, 6002, ... 601E) labelled with its name; from the 16th kept ROI on, the rest are merged into "
        "group 601E (the run summary says so).",
    )
    disclaimer: str = Field(
        default=DEFAULT_DISCLAIMER,
        max_length=200,
        description="Burned into the `color` series (and its legend panel) and written under the preview's legend; "
        "empty: none. Never burned into "
        "overlay series or source pixels.",
    )
    color_fill_opacity: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="`color` series: opacity of a translucent fill inside each ROI's outline (0: outline only).",
    )

    reformat_spacing_mm: float | None = Field(
        default=None,
        gt=0,
        description="Pixel and slice spacing of the coronal and sagittal grids (isotropic); null: the finest "
        "spacing of the input series.",
    )
    series_description: str = Field(
        default="NETRT {plane} overlay",
        max_length=64,
        description="SeriesDescription of written series; `{plane}` becomes axial, coronal or sagittal.",
    )
    series_number_base: int = Field(
        default=9000,
        ge=0,
        le=2**31 - 100,
        description="SeriesNumber of written series: base + 1 axial, + 2 coronal, + 3 sagittal; burn-in series + 10.",
    )
    structure_sets: Literal["latest", "each", "merge"] = Field(
        default="latest",
        description="Several RTSTRUCTs on the processed image series: `latest` processes the newest (by "
        "StructureSetDate/Time, then InstanceCreationDate/Time; equally new ones are refused), `each` processes "
        "every one on its own (own masks and series), `merge` combines their ROIs into one set (a name in several: "
        "the newest structure set's ROI is used).",
    )
    images_without_rtstruct: Literal["quarantine", "pass_through"] = Field(
        default="quarantine",
        description="A study with images but no RTSTRUCT: `quarantine` it (reason: no RTSTRUCT), or `pass_through` "
        "its images unchanged (anonymized as configured, no overlay) to the destinations, with a warning.",
    )

    @field_validator("planes", "outputs")
    @classmethod
    def _no_duplicates(cls, values: list[str]) -> list[str]:
        if len(set(values)) != len(values):
            raise ValueError("each value may be listed once")
        return values

    def output_kinds(self) -> list[OutputKind]:
        """The kinds made, in a fixed order: ``outputs`` plus ``burn_in`` when ``burn_in: true``."""
        wanted = set(self.outputs) | ({"burn_in"} if self.burn_in else set())
        order: list[OutputKind] = ["overlay", "burn_in", "seg", "color"]
        return [kind for kind in order if kind in wanted]


class FolderDestination(_Section):
    name: str = Field(description="Name used in logs, the transaction log and the CLI.")
    type: Literal["folder"] = Field(description="`folder`: files written under `path`.")
    path: Path = Field(description="Folder; series land in <path>/<StudyUID>/<SeriesUID>/<SOPUID>.dcm.")
    outputs: list[RoutedKind] | None = Field(
        default=None,
        description="Kinds this destination gets (see processing.outputs, plus `source`); null: every kind made.",
    )
    retries: int = Field(default=2, ge=0, description="Retries of a failed copy (e.g. a full or unmounted disk).")
    retry_delay_seconds: float = Field(
        default=10, ge=0, description="Wait before the first retry; doubles on every further retry."
    )


class DestinationTlsConfig(_Section):
    enabled: bool = Field(default=False, description="Send to this destination over TLS.")
    ca_file: Path | None = Field(
        default=None,
        description="PEM bundle of CAs the destination's certificate must be signed by; null: the system CAs.",
    )
    certfile: Path | None = Field(
        default=None, description="PEM client certificate presented to the destination (with `keyfile`)."
    )
    keyfile: Path | None = Field(default=None, description="PEM private key of `certfile`.")
    check_hostname: bool = Field(
        default=True, description="Require the destination's certificate to name `host` (DNS name or IP address)."
    )

    @model_validator(mode="after")
    def _cert_with_key(self) -> DestinationTlsConfig:
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("a client certificate needs both certfile and keyfile")
        return self


class DicomDestination(_Section):
    name: str = Field(description="Name used in logs, the transaction log and the CLI.")
    type: Literal["dicom"] = Field(description="`dicom`: sent with C-STORE.")
    ae_title: str = Field(description="Called AE title of the destination.")
    host: str = Field(description="Host name or address of the destination.")
    port: int = Field(ge=1, le=65535, description="TCP port of the destination.")
    outputs: list[RoutedKind] | None = Field(
        default=None,
        description="Kinds this destination gets (see processing.outputs, plus `source`); null: every kind made.",
    )
    calling_ae_title: str | None = Field(
        default=None, description="Calling AE title NETRT presents; default: listener.ae_title."
    )
    retries: int = Field(default=3, ge=0, description="Re-sends of failed instances after the first try.")
    retry_delay_seconds: float = Field(
        default=10, ge=0, description="Wait before the first retry; doubles on every further retry."
    )
    connect_timeout_seconds: float = Field(
        default=10, gt=0, description="Give up opening the TCP connection (and TLS handshake) after this long."
    )
    acse_timeout_seconds: float = Field(
        default=30, gt=0, description="Wait this long for the answer to an association request or release."
    )
    dimse_timeout_seconds: float = Field(
        default=60, gt=0, description="Wait this long for the response to each C-STORE or C-ECHO."
    )
    network_timeout_seconds: float = Field(
        default=60, gt=0, description="Abort the association when the connection is silent for this long."
    )
    max_pdu_size: int = Field(
        default=0, ge=0, description="Maximum PDU size NETRT accepts on this association, bytes; 0 means unlimited."
    )
    tls: DestinationTlsConfig = Field(
        default_factory=DestinationTlsConfig, description="Optional TLS (client side) for this destination."
    )
    storage_commitment: bool = Field(
        default=False,
        description="After the C-STOREs, ask the destination for Storage Commitment (PS3.4 Annex J); an "
        "instance counts as delivered only once the destination's report commits it.",
    )
    storage_commitment_timeout_seconds: float = Field(
        default=60,
        gt=0,
        description="Wait this long for the storage commitment report (N-EVENT-REPORT); none in time is a "
        "retryable failure.",
    )

    _ae = field_validator("ae_title", "calling_ae_title")(
        classmethod(lambda cls, v: v if v is None else _check_ae_title(v))
    )


Destination = Annotated[FolderDestination | DicomDestination, Field(discriminator="type")]


class PrefectConfig(_Section):
    api_url: str | None = Field(
        default=None,
        description="URL of an existing Prefect API (e.g. http://prefect:4200/api); null: NETRT "
        "starts its own local server (SQLite under data_dir).",
    )
    server_port: int = Field(
        default=4200, ge=1, le=65535, description="Port of the local Prefect server and its UI (127.0.0.1)."
    )
    process_study_concurrency: int = Field(
        default=4,
        ge=1,
        description="Most process-study flow runs at once across all workers (the deployment's concurrency "
        "limit; prefect.yaml reads it).",
    )
    worker_limit: int | None = Field(
        default=None, ge=1, description="Most flow runs one `netrt worker` runs at once; null: no limit."
    )
    local_server_idle_minutes: int = Field(
        default=60,
        ge=0,
        description="The background local Prefect server that `netrt process` and `netrt quarantine retry` "
        "start (and later commands reuse) stops itself after this many minutes without a NETRT command "
        "using it; 0: it runs until `netrt server stop`.",
    )


class QuarantineConfig(_Section):
    retry_cron: str = Field(default="*/30 * * * *", description="Cron schedule of the `rerun-quarantine` deployment.")
    max_attempts: int = Field(default=5, ge=1, description="Attempts after which a study stays in quarantine.")

    @field_validator("retry_cron")
    @classmethod
    def _five_fields(cls, value: str) -> str:
        if len(value.split()) != 5:
            raise ValueError("a cron schedule has five fields (minute hour day month weekday)")
        return value


class RetriesConfig(_Section):
    """Prefect task retries of the processing steps (delivery retries are per destination)."""

    validate_: int = Field(
        default=0,
        ge=0,
        alias="validate",
        description="Retries of the validate task (reading headers; 0: a bad study does not heal by waiting).",
    )
    anonymize: int = Field(default=0, ge=0, description="Retries of the anonymize task.")
    extract_masks: int = Field(default=0, ge=0, description="Retries of the extract-masks task.")
    write: int = Field(default=0, ge=0, description="Retries of each write-<plane> task (e.g. a full work disk).")
    delay_seconds: float = Field(
        default=10, ge=0, description="Wait before the first retry of these tasks; doubles on every further retry."
    )

    model_config = ConfigDict(extra="forbid", validate_assignment=True, serialize_by_alias=True)


class NetrtConfig(BaseSettings):
    """The whole configuration. Build it with :func:`load_config`, not directly."""

    model_config = SettingsConfigDict(
        extra="forbid",
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        validate_assignment=True,
    )

    paths: PathsConfig = Field(default_factory=PathsConfig, description="Where NETRT keeps its data.")
    listener: ListenerConfig = Field(default_factory=ListenerConfig, description="The DICOM listener (SCP).")
    anonymization: AnonymizationConfig = Field(
        default_factory=AnonymizationConfig, description="What identifying data leaves NETRT."
    )
    processing: ProcessingConfig = Field(default_factory=ProcessingConfig, description="Masks and overlays.")
    destinations: list[Destination] = Field(
        default_factory=list,
        description="Where results go; empty: one folder destination at <data_dir>/output.",
    )
    prefect: PrefectConfig = Field(default_factory=PrefectConfig, description="Orchestration.")
    quarantine: QuarantineConfig = Field(default_factory=QuarantineConfig, description="Failed studies.")
    retries: RetriesConfig = Field(default_factory=RetriesConfig, description="Task retries of the processing steps.")

    @field_validator("destinations")
    @classmethod
    def _unique_destination_names(cls, values: list[Destination]) -> list[Destination]:
        names = [d.name for d in values]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"destination names must be unique: {', '.join(duplicates)}")
        return values

    @model_validator(mode="after")
    def _routed_kinds_are_made(self) -> NetrtConfig:
        made = set(self.processing.output_kinds()) | {"source"}
        for index, destination in enumerate(self.destinations):
            missing = [kind for kind in destination.outputs or [] if kind not in made]
            if missing:
                raise ValueError(
                    f"destinations[{index}].outputs: {', '.join(missing)} not made (add to processing.outputs)"
                )
            if destination.outputs is not None and not destination.outputs:
                raise ValueError(f"destinations[{index}].outputs: empty (omit the key to send every kind made)")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment overrides the YAML file (passed as init values); no .env or secrets dir.
        return (env_settings, init_settings)

    def notes(self) -> list[str]:
        """What a valid config will do that a user may not expect, for `netrt config check`."""
        notes = []
        if self.processing.overlay_groups == "per_roi" and "overlay" in self.processing.output_kinds():
            notes.append(
                "processing.overlay_groups: per_roi: one overlay group per kept ROI; an image holds at most 16, so "
                "in a study with more kept ROIs the 16th and later share group 601E (the run summary names them)"
            )
        return notes

    def effective_destinations(self) -> list[FolderDestination | DicomDestination]:
        """The configured destinations, or the embedded folder default under the data dir."""
        if self.destinations:
            return list(self.destinations)
        return [FolderDestination(name="output", type="folder", path=self.paths.data_dir / "output")]


def _key_path(location: tuple[int | str, ...]) -> str:
    """`('destinations', 1, 'dicom', 'port')` -> `destinations[1].port` (drops union tags)."""
    parts: list[str] = []
    for item in location:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif not item.isidentifier() or (item in ("folder", "dicom") and parts and parts[-1].startswith("[")):
            continue  # a union branch or validator name pydantic adds, not a key the user wrote
        else:
            parts.append(("." if parts else "") + item)
    return "".join(parts) or "(top level)"


def _explain(error: ErrorDetails) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    if kind == "int_parsing" or kind == "int_type":
        return "not a valid integer"
    if kind == "float_parsing" or kind == "float_type":
        return "not a valid number"
    if kind == "bool_parsing" or kind == "bool_type":
        return "not a valid boolean (true/false)"
    message = str(error["msg"])
    return message.removeprefix("Value error, ")


def problems_of(exc: ValidationError) -> list[tuple[str, str]]:
    """Every (key path, reason) pydantic found, in the user's terms."""
    return [(_key_path(tuple(e["loc"])), _explain(e)) for e in exc.errors()]


def load_config(path: Path | str | None = None) -> NetrtConfig:
    """Read, validate and return the configuration.

    ``path`` None gives the defaults. ``NETRT_*`` environment variables override either. Raises
    :class:`ConfigError` naming every offending key path.
    """
    data: Any = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config file: {exc.strerror or exc}") from exc
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, not {type(data).__name__}")
    try:
        return NetrtConfig(**data)
    except ValidationError as exc:
        problems = problems_of(exc)
        lines = "\n".join(f"  {key}: {why}" for key, why in problems)
        overridden = sorted(k for k in os.environ if k.startswith(ENV_PREFIX))
        hint = f"\n(environment overrides in effect: {', '.join(overridden)})" if overridden else ""
        raise ConfigError(f"{source}: invalid configuration\n{lines}{hint}", problems) from None


def dump_config(config: NetrtConfig) -> str:
    """The effective configuration as YAML, in the same shape a user writes."""
    data = config.model_dump(mode="json")
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)
