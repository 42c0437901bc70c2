"""Where NETRT keeps things under the data dir, in one place.

Every folder name here is a contract users and scripts rely on (incoming/, studies/,
quarantine/, logs/, output/); only this module spells them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from netrt.uids import checked_uid


@dataclass(frozen=True)
class DataLayout:
    """The folders under ``data_dir``; build with :meth:`from_data_dir`."""

    root: Path

    @classmethod
    def from_data_dir(cls, data_dir: Path | str) -> DataLayout:
        return cls(Path(data_dir).expanduser().resolve())

    @property
    def incoming(self) -> Path:
        """Studies being received; one folder per StudyInstanceUID."""
        return self.root / "incoming"

    @property
    def studies(self) -> Path:
        """Sealed (complete) studies waiting for or under processing."""
        return self.root / "studies"

    @property
    def processed(self) -> Path:
        """Studies whose flow run succeeded, moved here from studies/ (kept; never deleted by NETRT)."""
        return self.root / "processed"

    @property
    def quarantine(self) -> Path:
        """Studies that failed for good, each with a reason.json; never deleted but by purge."""
        return self.root / "quarantine"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def output(self) -> Path:
        """The embedded folder destination used when none is configured."""
        return self.root / "output"

    @property
    def work(self) -> Path:
        """Intermediate products of flow runs (masks, written series before delivery)."""
        return self.root / "work"

    @property
    def cache(self) -> Path:
        """Persisted Prefect task results (the cache that makes re-runs cheap)."""
        return self.root / "cache"

    @property
    def prefect_home(self) -> Path:
        """PREFECT_HOME of the embedded server and clients: its SQLite database lives here."""
        return self.root / "prefect"

    @property
    def state(self) -> Path:
        """Small durable bookkeeping of the services (e.g. ``state/sealed/<uid>.json``: has this
        sealed study's flow run been created?); kept out of the study folders, which are read whole."""
        return self.root / "state"

    @property
    def app_log(self) -> Path:
        return self.logs / "netrt.log"

    @property
    def transaction_log(self) -> Path:
        return self.logs / "transactions.jsonl"

    def study_dir(self, area: Path, study_uid: str) -> Path:
        """``<area>/<StudyInstanceUID>`` after checking the UID grammar (never a path from raw input)."""
        return area / checked_uid(study_uid, "StudyInstanceUID")

    def create(self) -> DataLayout:
        for folder in (self.incoming, self.studies, self.processed, self.quarantine, self.logs, self.work, self.cache):
            folder.mkdir(parents=True, exist_ok=True)
        return self
