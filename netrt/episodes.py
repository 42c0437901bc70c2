"""Delivery episodes: when the acknowledgements of earlier attempts may stand in for sending again.

A destination's acknowledgements (the progress file of :mod:`netrt.send`) prove that *this*
destination stored *these* instances *then*. They let a retry resume instead of re-sending, but
only while the question is still "finish that delivery": the task's own retries, a quarantine
retry of the failed delivery (`netrt quarantine retry`, the scheduled `rerun-quarantine`) and a
Prefect UI retry of the failed run. Those make up one *episode*. Anything else (`netrt process`
again, a study re-sealed by the listener, a UI retry of a run that had completed) is a new run
asking for a new delivery: the PACS may have been purged or replaced since, so it opens a new
episode and every instance is sent again. Without episodes, a finished delivery's acknowledgements
would make every later run of the same study report "delivered" while sending nothing, even to
an unreachable destination.

On disk, per study (public UID), under ``<data_dir>/work/<study>/delivery/``:

- ``episodes/<id>/episode.json``: when it opened, the flow runs that took part, each destination's
  state (``delivered`` with the digest of the files it got, or not yet), and when it closed;
- ``episodes/<id>/<destination key>.jsonl``: that destination's progress file in this episode;
- ``open``: the id of the open episode, if any. An episode closes (``complete``) when every
  destination has delivered, or (``superseded``) when a new run opens another. Closed episodes
  are kept for history and never consulted again.

Deciding "continuation or new run" needs only flow-run ids: a run continues the open episode when
that episode already counts one of ``continuing_runs`` among its runs (the run's own id, for a UI
retry of it; the id of the quarantined run, for a quarantine retry).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netrt.errors import NetrtError
from netrt.fileio import atomic_write_bytes, fsync_dir
from netrt.logs import utc_now_iso

OPEN_POINTER = "open"
EPISODE_FILE = "episode.json"
EPISODES_FOLDER = "episodes"


class EpisodeError(NetrtError):
    """The delivery-episode record of a study is unreadable or cannot be written."""


def destination_key(name: str) -> str:
    """A file-name-safe key for a destination name (names are free text in the config)."""
    return hashlib.sha256(name.encode("utf-8")).hexdigest()[:12]


def files_digest(files: Sequence[Path]) -> str:
    """What a destination was given, cheaply: the written files' paths and sizes.

    Written paths are keyed by the content and settings they come from (the cache key), so the
    same digest means the same series; a changed study, config or anonymization gives new paths.
    """
    digest = hashlib.sha256()
    for path in sorted(str(p) for p in files):
        try:
            size = Path(path).stat().st_size
        except OSError:
            size = -1
        digest.update(f"{path}\0{size}\n".encode())
    return digest.hexdigest()


@dataclass
class DeliveryEpisode:
    """One delivery episode of one study (see the module docstring)."""

    folder: Path
    id: str
    opened_at: str
    runs: list[str]
    destinations: dict[str, dict[str, Any]] = field(default_factory=dict)
    resumed: bool = False
    closed_at: str | None = None
    status: str = "open"

    def progress_file(self, destination: str) -> Path:
        """The destination's progress file inside this episode."""
        return self.folder / f"{destination_key(destination)}.jsonl"

    def delivered_earlier(self, destination: str, digest: str) -> dict[str, Any] | None:
        """The record of a delivery of the same files to ``destination`` completed in this episode."""
        state = self.destinations.get(destination)
        if state and state.get("status") == "delivered" and state.get("files_digest") == digest:
            return state
        return None

    def mark_delivered(self, destination: str, digest: str, run: str | None, instances: int) -> None:
        self.destinations[destination] = {
            "status": "delivered",
            "files_digest": digest,
            "instances": instances,
            "run": run,
            "at": utc_now_iso(),
        }
        self._save()

    def mark_failed(self, destination: str, run: str | None, reason: str) -> None:
        self.destinations[destination] = {"status": "failed", "run": run, "reason": reason, "at": utc_now_iso()}
        self._save()

    def close_if_complete(self, destinations: Iterable[str]) -> bool:
        """Close the episode when every one of ``destinations`` has delivered in it."""
        if any(self.destinations.get(name, {}).get("status") != "delivered" for name in destinations):
            return False
        self._close("complete")
        return True

    def _close(self, status: str) -> None:
        self.status = status
        self.closed_at = utc_now_iso()
        self._save()
        pointer = self.folder.parent.parent / OPEN_POINTER
        if _read_pointer(pointer) == self.id:
            pointer.unlink()
            fsync_dir(pointer.parent)

    def _save(self) -> None:
        record = {
            "id": self.id,
            "opened_at": self.opened_at,
            "runs": self.runs,
            "destinations": self.destinations,
            "status": self.status,
            "closed_at": self.closed_at,
        }
        try:
            atomic_write_bytes(self.folder / EPISODE_FILE, (json.dumps(record, indent=2) + "\n").encode("utf-8"))
        except OSError as exc:
            raise EpisodeError(f"cannot write {self.folder / EPISODE_FILE}: {exc.strerror or exc}") from exc


def _read_pointer(pointer: Path) -> str | None:
    try:
        text = pointer.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise EpisodeError(f"{pointer}: unreadable ({exc})") from exc
    # Ids are uuid4 hex written by this module; anything else is not used as a path.
    return text if len(text) == 32 and all(c in "0123456789abcdef" for c in text) else None


def _load(folder: Path) -> DeliveryEpisode | None:
    try:
        record = json.loads((folder / EPISODE_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise EpisodeError(f"{folder / EPISODE_FILE}: unreadable ({exc})") from exc
    return DeliveryEpisode(
        folder=folder,
        id=str(record["id"]),
        opened_at=str(record["opened_at"]),
        runs=[str(r) for r in record.get("runs", [])],
        destinations=dict(record.get("destinations", {})),
        closed_at=record.get("closed_at"),
        status=str(record.get("status", "open")),
    )


def open_episode(delivery_dir: Path) -> DeliveryEpisode | None:
    """The study's open episode, if any (for inspection and tests)."""
    episode_id = _read_pointer(delivery_dir / OPEN_POINTER)
    return None if episode_id is None else _load(delivery_dir / EPISODES_FOLDER / episode_id)


def closed_episodes(delivery_dir: Path) -> list[DeliveryEpisode]:
    """Every closed episode of the study, oldest first (history only)."""
    root = delivery_dir / EPISODES_FOLDER
    if not root.is_dir():
        return []
    loaded = [_load(folder) for folder in root.iterdir() if folder.is_dir()]
    return sorted((e for e in loaded if e is not None and e.status != "open"), key=lambda e: e.opened_at)


def begin_delivery(delivery_dir: Path, run: str | None, continuing_runs: Iterable[str | None]) -> DeliveryEpisode:
    """The episode this run delivers in: the open one when the run continues it, else a new one.

    ``run`` is this flow run's id; ``continuing_runs`` the flow-run ids whose failed delivery this
    run may continue (its own id, and on a quarantine retry the quarantined run's id). An open
    episode that this run does not continue is closed as ``superseded``.
    """
    continuing = {r for r in continuing_runs if r}
    current = open_episode(delivery_dir)
    if current is not None and continuing & set(current.runs):
        if run and run not in current.runs:
            current.runs.append(run)
        current.resumed = True
        current._save()
        return current
    if current is not None:
        current._close("superseded")
    episode_id = uuid.uuid4().hex
    folder = delivery_dir / EPISODES_FOLDER / episode_id
    try:
        folder.mkdir(parents=True, exist_ok=False)
    except OSError as exc:
        raise EpisodeError(f"cannot create {folder}: {exc.strerror or exc}") from exc
    episode = DeliveryEpisode(folder=folder, id=episode_id, opened_at=utc_now_iso(), runs=[run] if run else [])
    episode._save()
    atomic_write_bytes(delivery_dir / OPEN_POINTER, episode_id.encode("ascii"))
    fsync_dir(delivery_dir)
    return episode
