"""Delivery by C-STORE to DICOM destinations (a PACS, a TPS, another node), and C-ECHO for set-up.

One call of :func:`send_to_dicom` is one attempt: one association, every instance not yet
acknowledged sent once, every C-STORE status checked. It does not loop or sleep; the ``deliver``
task retries a failed attempt (Prefect task retries with doubling delay, visible in the UI) only
when :attr:`DeliveryError.retryable` says waiting may help. What makes those retries cheap and
exact is the progress file: each acknowledged instance is appended (and flushed to the operating
system) the moment its success status arrives, so the next attempt (a task retry, or a quarantine
retry days later) sends only what is still missing and never an acknowledged instance again (only
the one in flight when a connection broke can reach the destination twice; a PACS keeps one copy
per SOP Instance UID). The file is fsync'd at most once a second and when the attempt ends, not per
line: a killed process loses no line (they are in the kernel already), and a power cut costs at
most the last second's acknowledgements, which the next attempt sends again (harmless, as above),
while an fsync per instance cost ~0.9 ms each, ~1 s per 1124 instances here (BENCHMARKS.md,
delivery).

The association itself (sockets with TCP_NODELAY, why one did not come up) is
:mod:`netrt.association`; the progress file is :mod:`netrt.progress`.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import _config as _pynetdicom_config
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation
from pynetdicom.presentation import PresentationContext, build_context, build_role
from pynetdicom.sop_class import StorageCommitmentPushModel, Verification  # type: ignore[attr-defined]
from pynetdicom.status import code_to_category

from netrt.association import (
    _associate,
    _ended,
    _Trace,
    _where,
)
from netrt.commitment import (
    ACTION_REQUEST_COMMIT,
    STORAGE_COMMITMENT_INSTANCE,
    CommitmentReport,
    ReportBox,
    ReportRoute,
    discard_report,
    failure_reason_text,
    new_transaction_uid,
    request_dataset,
    wait_for_report,
)
from netrt.config import DicomDestination
from netrt.deliver import DeliveryOutcome
from netrt.errors import DeliveryError
from netrt.identity import parse_file_meta
from netrt.progress import _progress, _ProgressLog

logger = logging.getLogger(__name__)

# PS3.8 9.3.2.2: context IDs are odd numbers 1-255, so an association carries at most 128 contexts.
MAX_PRESENTATION_CONTEXTS = 128
# What a file is converted to when the destination does not accept its stored transfer syntax.
_FALLBACK_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


@dataclass(frozen=True)
class _Instance:
    """One file to deliver, identified by what the destination will key it on."""

    path: Path
    sop_class_uid: UID
    sop_instance_uid: str
    transfer_syntax: UID
    sha256: str


class _LazyInstance:
    """An :class:`_Instance` whose SHA-256 is computed on a background thread (:class:`_Digests`)
    and waited for only when it is needed: the file meta is read at once, for the contexts."""

    def __init__(self, path: Path, sop_class_uid: UID, sop_instance_uid: str, transfer_syntax: UID, digest: Any):
        self.path = path
        self.sop_class_uid = sop_class_uid
        self.sop_instance_uid = sop_instance_uid
        self.transfer_syntax = transfer_syntax
        self._digest = digest
        self._destination = ""

    @property
    def sha256(self) -> str:
        try:
            return str(self._digest.result())
        except OSError as exc:
            raise DeliveryError(self._destination, f"{self.path}: cannot read this instance: {exc}", False) from exc


class _Digests:
    """SHA-256 of each file, in order, on one background thread.

    The progress file keys an acknowledgement on the file's content, so every file is hashed; doing
    it before the association (as :func:`_read_instance` does) cost ~0.5 s per 1124 CT-sized files
    before the first C-STORE. hashlib and file reads release the GIL, so here the hashing runs while
    the sending thread waits for the destination's responses (issue 20).
    """

    def __init__(self, paths: Sequence[Path]) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netrt-sha256")
        self.futures = [self._executor.submit(_sha256_of, path) for path in paths]

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


def _sha256_of(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _read_instance_lazily(destination: DicomDestination, path: Path, digest: Any) -> _LazyInstance:
    """The file meta now (its first 4 KiB, else pydicom), the digest when it is asked for."""
    try:
        with path.open("rb") as handle:
            parsed = parse_file_meta(handle.read(4096))
        if parsed is None:
            meta = read_file_meta_info(path)
            parsed = (
                str(meta.MediaStorageSOPClassUID),
                str(meta.MediaStorageSOPInstanceUID),
                str(meta.TransferSyntaxUID),
            )
    except Exception as exc:  # unreadable or not DICOM Part 10: nothing a retry can change
        raise DeliveryError(
            destination.name, f"{path}: cannot read the file meta of this instance: {exc}", False
        ) from exc
    instance = _LazyInstance(path, UID(parsed[0]), parsed[1], UID(parsed[2]), digest)
    instance._destination = destination.name
    return instance


@dataclass(frozen=True)
class _Failure:
    instance: _Instance
    reason: str
    retryable: bool


# --- instances and presentation contexts ---------------------------------------------------------


def _read_instance(destination: DicomDestination, path: Path) -> _Instance:
    try:
        data = path.read_bytes()
        meta = read_file_meta_info(path)
        sop_class = UID(str(meta.MediaStorageSOPClassUID))
        sop_instance = str(meta.MediaStorageSOPInstanceUID)
        syntax = UID(str(meta.TransferSyntaxUID))
    except Exception as exc:  # unreadable or not DICOM Part 10: nothing a retry can change
        raise DeliveryError(
            destination.name, f"{path}: cannot read the file meta of this instance: {exc}", False
        ) from exc
    return _Instance(path, sop_class, sop_instance, syntax, hashlib.sha256(data).hexdigest())


def _requested_contexts(destination: DicomDestination, instances: Sequence[_Instance]) -> list[PresentationContext]:
    """Contexts for exactly what is being sent.

    One context per (SOP class, stored transfer syntax) with that syntax alone, so a peer that
    accepts it cannot pick another; plus, per SOP class, one fallback context with the uncompressed
    little-endian syntaxes not proposed alone, used only for files whose stored syntax is refused.
    """
    stored: dict[UID, list[UID]] = {}
    for instance in instances:
        syntaxes = stored.setdefault(instance.sop_class_uid, [])
        if instance.transfer_syntax not in syntaxes:
            syntaxes.append(instance.transfer_syntax)
    contexts: list[PresentationContext] = []
    for sop_class, syntaxes in stored.items():
        contexts.extend(build_context(sop_class, [syntax]) for syntax in syntaxes)
        fallback: list[str | UID] = [syntax for syntax in _FALLBACK_SYNTAXES if syntax not in syntaxes]
        if fallback:
            contexts.append(build_context(sop_class, fallback))
    if len(contexts) > MAX_PRESENTATION_CONTEXTS:
        raise DeliveryError(
            destination.name,
            f"{len(stored)} SOP classes in {sum(len(s) for s in stored.values())} transfer syntaxes need "
            f"{len(contexts)} presentation contexts; one association carries at most {MAX_PRESENTATION_CONTEXTS}",
            retryable=False,
        )
    return contexts


def _sop_name(uid: UID) -> str:
    return f"{uid.name} ({uid})" if uid.name and uid.name != str(uid) else str(uid)


def _payload(accepted: set[tuple[str, str]], instance: _Instance) -> Path | Dataset:
    """What to hand pynetdicom for ``instance``: the file itself when the peer accepted its stored
    transfer syntax (streamed as stored, byte for byte, never decoded), else a dataset converted to
    an accepted uncompressed syntax (the pixels the stored file decodes to: the same SOP instance).

    Raises ValueError naming what the peer refused when no accepted context fits.
    """
    if (instance.sop_class_uid, instance.transfer_syntax) in accepted:
        return instance.path
    if not any((instance.sop_class_uid, syntax) in accepted for syntax in _FALLBACK_SYNTAXES):
        raise ValueError(
            f"the destination accepts {_sop_name(instance.sop_class_uid)} in neither the stored transfer syntax "
            f"{instance.transfer_syntax.name} nor uncompressed"
        )
    if instance.transfer_syntax == ExplicitVRBigEndian:
        raise ValueError("the destination refuses Explicit VR Big Endian and NETRT does not convert from it")
    dataset = pydicom.dcmread(instance.path)
    if instance.transfer_syntax.is_compressed:
        # Only the encoding changes, so the SOP Instance UID stays (pydicom would make a new one).
        dataset.decompress(generate_instance_uid=False)
    # pynetdicom re-encodes an uncompressed dataset in whichever uncompressed syntax was accepted.
    return dataset


def _status_retryable(code: int) -> bool:
    """Whether a C-STORE failure status may go away by itself (resources, a busy or failing store),
    as opposed to a refusal of this data (SOP class, data set, authorisation) that will repeat."""
    if 0xA700 <= code <= 0xA7FF:  # out of resources
        return True
    if 0xA900 <= code <= 0xA9FF or 0xC000 <= code <= 0xCFFF:  # data set does not match / cannot understand
        return False
    return code not in (0x0117, 0x0122, 0x0124)  # invalid instance, SOP class not supported, not authorised


# --- the two entry points ----------------------------------------------------------------------


def send_to_dicom(
    destination: DicomDestination,
    files: Sequence[Path],
    *,
    calling_ae_title: str,
    progress_file: Path | None = None,
    run: str = "",
    report_route: ReportRoute | None = None,
    on_stored: Callable[[int, int], None] | None = None,
) -> DeliveryOutcome:
    """One delivery attempt of ``files`` to ``destination`` by C-STORE over one association.

    ``on_stored(acknowledged, total)`` is called after each new acknowledgement, counting those of
    earlier attempts too (a progress display; it must be quick and must not raise).

    Instances recorded in ``progress_file`` as acknowledged (same SOPInstanceUID and content) are
    skipped; each new acknowledgement (success or warning status) is appended there at once (flushed;
    fsync'd once a second and at the end), tagged with ``run``. Use one progress file per
    destination and delivery episode (:mod:`netrt.episodes`), so retries re-send only what is
    missing and a new run sends everything again.

    Returns the outcome when every instance is acknowledged: ``stored`` counts the instances
    acknowledged under the tag ``run`` (this attempt and earlier attempts of the same run),
    ``earlier`` those acknowledged under other tags. Raises :class:`DeliveryError` otherwise,
    saying how many instances were not stored and why, with the same two counts; ``retryable`` is
    False when waiting cannot help (association rejected permanently, TLS refused, only refusals
    of the data itself).

    With ``destination.storage_commitment``, after the C-STOREs (all acknowledged) one N-ACTION
    asks the destination to commit every acknowledged instance not yet committed, and the attempt
    waits for its report (:mod:`netrt.commitment`): on this association, or on a new one to
    ``report_route`` (its folder, and a short-lived receiver on its address when the port is
    free; None: this association only). Committed and failed instances are appended to the
    progress file; failed ones count as not acknowledged, so the next attempt sends them again.
    The outcome's ``committed`` then counts the committed instances; a failed instance, a refused
    request or no report within ``storage_commitment_timeout_seconds`` raise DeliveryError.
    """
    digests = _Digests([Path(path) for path in files])
    try:
        return _send_to_dicom(
            destination,
            files,
            digests,
            calling_ae_title=calling_ae_title,
            progress_file=progress_file,
            run=run,
            report_route=report_route,
            on_stored=on_stored,
        )
    finally:
        digests.close()


def _send_to_dicom(
    destination: DicomDestination,
    files: Sequence[Path],
    digests: _Digests,
    *,
    calling_ae_title: str,
    progress_file: Path | None,
    run: str,
    report_route: ReportRoute | None,
    on_stored: Callable[[int, int], None] | None,
) -> DeliveryOutcome:
    started = time.perf_counter()
    done, committed_keys = _progress(progress_file)
    instances: list[Any] = [
        _read_instance_lazily(destination, Path(path), digest)
        for path, digest in zip(files, digests.futures, strict=True)
    ]
    where = _where(destination)
    commit = destination.storage_commitment
    pending: list[Any] = []
    queued: set[tuple[str, str]] = set()
    this_run = 0
    # A first attempt without storage commitment (nothing acknowledged yet) sends every file, so
    # nothing waits for the digests here: each is needed when its instance is acknowledged (or found
    # to repeat an instance already sent in this attempt), by which time the background thread has
    # usually made it. Otherwise every key is needed first, to know what is missing.
    lazy = not done and not commit
    if lazy:
        pending = list(instances)
    else:
        for instance in instances:
            key = (instance.sop_instance_uid, instance.sha256)
            if key in done:
                this_run += done[key] == run
            elif key not in queued:
                pending.append(instance)
                queued.add(key)
    earlier = len(instances) - len(pending) - this_run
    uncommitted = commit and any((i.sop_instance_uid, i.sha256) not in committed_keys for i in instances)
    if not pending and not uncommitted:
        return DeliveryOutcome(
            destination.name,
            len(instances),
            this_run,
            earlier,
            f"all {len(instances)} instances already acknowledged by {where} "
            f"({this_run} in this run, {earlier} in earlier runs of this delivery)"
            + ("; all committed (storage commitment)" if commit else ""),
            committed=len(instances) if commit else None,
        )

    contexts = _requested_contexts(destination, pending)
    box: ReportBox | None = None
    roles: list[SCP_SCU_RoleSelectionNegotiation] = []
    if commit:
        if len(contexts) >= MAX_PRESENTATION_CONTEXTS:
            raise DeliveryError(
                destination.name,
                f"{len(contexts)} presentation contexts for the instances leave none for Storage Commitment; "
                f"one association carries at most {MAX_PRESENTATION_CONTEXTS}",
                retryable=False,
            )
        contexts.append(build_context(StorageCommitmentPushModel))
        # Propose the SCP role too, so the destination may send its report on this association.
        roles.append(build_role(StorageCommitmentPushModel, scu_role=True, scp_role=True))
        box = ReportBox()
    try:
        progress = _ProgressLog(progress_file, destination.name, run)
    except OSError as exc:
        raise DeliveryError(
            destination.name,
            f"cannot write the progress file {progress_file}: {exc}",
            stored=this_run,
            earlier=earlier,
        ) from exc
    try:
        assoc, trace = _associate(
            destination,
            calling_ae_title,
            contexts,
            roles=roles,
            handlers=[(evt.EVT_N_EVENT_REPORT, box.handler), (evt.EVT_DIMSE_SENT, box.sent)] if box is not None else [],
        )
    except DeliveryError as exc:
        progress.close()
        exc.stored, exc.earlier = this_run, earlier
        raise
    except BaseException:
        progress.close()
        raise
    accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts}
    # send_c_store(path) then streams the file's data set from disk as stored instead of decoding and
    # re-encoding it (less CPU and memory, and the peer gets exactly the stored bytes). A
    # process-wide pynetdicom setting; it changes nothing for datasets passed as objects.
    _pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
    failures: list[_Failure] = []
    sent = 0
    repeated = 0  # lazy: instances whose SOP instance and content were already sent in this attempt
    sent_uids: set[str] = set()
    commitment: tuple[int, str] | None = None
    try:
        for index, instance in enumerate(pending):
            if lazy and instance.sop_instance_uid in sent_uids and (instance.sop_instance_uid, instance.sha256) in done:
                repeated += 1
                continue
            if not assoc.is_established or trace.closed:
                why = _ended(trace)
                failures.extend(_Failure(rest, f"not sent: {why}", True) for rest in pending[index:])
                break
            try:
                payload = _payload(accepted, instance)
            except ValueError as exc:
                failures.append(_Failure(instance, str(exc), False))
                continue
            except Exception as exc:  # decoding a compressed file for conversion failed
                failures.append(_Failure(instance, f"cannot convert for sending: {exc}", False))
                continue
            try:
                response = assoc.send_c_store(payload, msg_id=index % 0xFFFF + 1)
            except (ValueError, AttributeError) as exc:  # no context fits / cannot encode
                failures.append(_Failure(instance, f"cannot send: {exc}", False))
                continue
            except RuntimeError as exc:  # the association ended between two instances
                failures.append(_Failure(instance, f"not sent: {_ended(trace)} ({exc})", True))
                continue
            except OSError as exc:  # the file could not be read while streaming it
                # Part of its message may be on the wire already: nothing more can follow it.
                assoc.abort()
                failures.append(_Failure(instance, f"cannot read {instance.path}: {exc.strerror or exc}", True))
                failures.extend(
                    _Failure(rest, "not sent: association aborted after a read error", True)
                    for rest in pending[index + 1 :]
                )
                break
            if "Status" not in response:
                # The connection closed or the DIMSE timeout expired; either way pynetdicom has
                # aborted the association, so nothing more can be sent on it.
                reason = (
                    f"no C-STORE response: {_ended(trace)}"
                    if trace.closed
                    else f"no C-STORE response within {destination.dimse_timeout_seconds:g} s (association aborted)"
                )
                failures.append(_Failure(instance, reason, True))
                failures.extend(_Failure(rest, f"not sent: {_ended(trace)}", True) for rest in pending[index + 1 :])
                break
            status = int(response.Status)
            category = code_to_category(status)
            comment = str(response.get("ErrorComment", "") or "")
            if category in ("Success", "Warning"):
                if category == "Warning":
                    logger.warning(
                        "%s: %s stored with warning status 0x%04X%s",
                        destination.name,
                        instance.path,
                        status,
                        f" ({comment})" if comment else "",
                    )
                progress.record(instance, status)
                done[(instance.sop_instance_uid, instance.sha256)] = run
                sent_uids.add(instance.sop_instance_uid)
                sent += 1
                if on_stored is not None:
                    on_stored(len(instances) - len(pending) + sent, len(instances))
            else:
                reason = f"C-STORE status 0x{status:04X} ({category}{': ' + comment if comment else ''})"
                failures.append(_Failure(instance, reason, _status_retryable(status)))
        if commit and not failures:
            try:
                commitment = _commit(
                    destination, assoc, trace, instances, done, committed_keys, progress, box, report_route
                )
            except DeliveryError as exc:
                exc.stored, exc.earlier = this_run + sent, earlier
                raise
    finally:
        progress.close()
        if assoc.is_established:
            assoc.release()
    earlier += repeated  # counted as the upfront pass counts them (neither pending nor this run's)
    elapsed = time.perf_counter() - started
    if failures:
        for failure in failures:
            logger.debug("%s: %s not stored: %s", destination.name, failure.instance.path, failure.reason)
        reasons = Counter(failure.reason for failure in failures)
        summary = "; ".join(f"{count} x {reason}" for reason, count in reasons.most_common(3))
        if len(reasons) > 3:
            summary += f"; {len(reasons) - 3} other reasons (see the log)"
        raise DeliveryError(
            destination.name,
            f"{len(failures)} of {len(instances)} instances not stored at {where} "
            f"({sent} stored in this attempt, {this_run} in earlier attempts of this run, "
            f"{earlier} in earlier runs of this delivery): {summary}",
            retryable=any(failure.retryable for failure in failures),
            stored=this_run + sent,
            earlier=earlier,
        )
    logger.info(
        "%s: %d instances stored at %s in %.2f s (%d by earlier attempts of this run, %d by earlier runs)",
        destination.name,
        sent,
        where,
        elapsed,
        this_run,
        earlier,
    )
    return DeliveryOutcome(
        destination.name,
        len(instances),
        this_run + sent,
        earlier,
        f"{sent} instances stored at {where} in {elapsed:.1f} s"
        + (f"; {this_run} by earlier attempts of this run" if this_run else "")
        + (f"; {earlier} by earlier runs of this delivery" if earlier else "")
        + (f"; {commitment[1]}" if commitment is not None else ""),
        committed=commitment[0] if commitment is not None else None,
    )


# --- storage commitment ------------------------------------------------------------------------


def _commit(
    destination: DicomDestination,
    assoc: Association,
    trace: _Trace,
    instances: Sequence[_Instance],
    done: dict[tuple[str, str], str],
    committed_keys: set[tuple[str, str]],
    progress: _ProgressLog,
    box: ReportBox | None,
    route: ReportRoute | None,
) -> tuple[int, str]:
    """Ask ``destination`` to commit every acknowledged, not yet committed instance; wait for the
    report; record what it says in the progress file. Returns (instances committed, detail);
    raises DeliveryError when the request is refused, no report comes in time, or any instance is
    not committed (naming each, with its FailureReason)."""
    name, where = destination.name, _where(destination)
    asked: dict[str, _Instance] = {}
    for instance in instances:
        key = (instance.sop_instance_uid, instance.sha256)
        if key in done and key not in committed_keys:
            asked.setdefault(instance.sop_instance_uid, instance)
    if not asked:
        return len(instances), f"storage commitment: all {len(instances)} committed"
    if not assoc.is_established or trace.closed:
        raise DeliveryError(name, f"storage commitment not requested: {_ended(trace)} after the C-STOREs")
    if not any(cx.abstract_syntax == StorageCommitmentPushModel for cx in assoc.accepted_contexts):
        raise DeliveryError(
            name,
            f"{where} does not accept Storage Commitment Push Model (1.2.840.10008.1.20.1); enable storage "
            "commitment there or set storage_commitment: false",
            retryable=False,
        )
    folder = Path(route.reports_dir) if route is not None else None
    receiver = route.make_receiver() if route is not None else None
    transaction = new_transaction_uid()
    try:
        if receiver is not None:
            receiver.try_start()  # before the request: a report may follow its response at once
        requested = time.perf_counter()
        info = request_dataset(transaction, ((str(i.sop_class_uid), uid) for uid, i in asked.items()))
        status, _ = assoc.send_n_action(
            info, ACTION_REQUEST_COMMIT, StorageCommitmentPushModel, STORAGE_COMMITMENT_INSTANCE
        )
        if "Status" not in status:
            raise DeliveryError(
                name,
                f"no answer from {where} to the storage commitment request (N-ACTION, Transaction UID "
                f"{transaction}): {_ended(trace) if trace.closed else 'association aborted or timed out'}; a PACS "
                f"does this when NETRT's AE title is not registered with it (e.g. Orthanc's DicomModalities)",
            )
        code = int(status.Status)
        if code != 0x0000:
            raise DeliveryError(
                name,
                f"{where} refused the storage commitment request (Transaction UID {transaction}) with status "
                f"0x{code:04X} ({code_to_category(code)})",
                retryable=code in (0x0110, 0x0213),
            )
        report = wait_for_report(
            transaction,
            destination.storage_commitment_timeout_seconds,
            box=box,
            folder=folder,
            receiver=receiver,
        )
        waited = time.perf_counter() - requested
        listened = receiver.running if receiver is not None else False
    finally:
        if receiver is not None:
            receiver.stop()
    if report is None:
        places = ["on the requesting association"]
        if route is not None:
            how = (
                "its own receiver"
                if listened
                else "the running NETRT listener or another delivery's receiver (the port was taken)"
            )
            places.append(f"as {route.where()} ({how})")
            places.append(f"in {route.reports_dir}")
        raise DeliveryError(
            name,
            f"no storage commitment report from {where} for Transaction UID {transaction} within "
            f"{destination.storage_commitment_timeout_seconds:g} s; NETRT listened " + ", ".join(places),
        )
    return _apply_report(destination, report, asked, instances, committed_keys, progress, folder, waited)


def _apply_report(
    destination: DicomDestination,
    report: CommitmentReport,
    asked: dict[str, _Instance],
    instances: Sequence[_Instance],
    committed_keys: set[tuple[str, str]],
    progress: _ProgressLog,
    folder: Path | None,
    waited: float,
) -> tuple[int, str]:
    failed: list[tuple[str, int | None]] = []
    missing: list[str] = []
    for uid, instance in asked.items():
        if uid in report.failed:
            progress.record_commitment(instance, "commit_failed", report.transaction_uid, report.failed[uid])
            failed.append((uid, report.failed[uid]))
        elif uid in report.committed:
            progress.record_commitment(instance, "committed", report.transaction_uid)
            committed_keys.add((uid, instance.sha256))
        else:
            missing.append(uid)
    progress.sync()
    if folder is not None:
        discard_report(folder, report.transaction_uid)
    committed = sum((i.sop_instance_uid, i.sha256) in committed_keys for i in instances)
    logger.info(
        "%s: storage commitment %s: %d committed, %d failed, %d not in the report (%s, %.2f s)",
        destination.name,
        report.transaction_uid,
        len(asked) - len(failed) - len(missing),
        len(failed),
        len(missing),
        report.route,
        waited,
    )
    if failed or missing:
        named = [f"{uid} ({failure_reason_text(reason)})" for uid, reason in failed]
        named += [f"{uid} (not in the report)" for uid in missing]
        shown = "; ".join(named[:10]) + (
            f"; and {len(named) - 10} more (see the progress file)" if len(named) > 10 else ""
        )
        raise DeliveryError(
            destination.name,
            f"{len(failed) + len(missing)} of {len(instances)} instances not committed by {_where(destination)} "
            f"(storage commitment, Transaction UID {report.transaction_uid}, report on the {report.route}): "
            f"{shown}; the next attempt sends them again",
            retryable=not failed or any(reason != 0x0122 for _, reason in failed),
        )
    return committed, (
        f"storage commitment: all {committed} committed (report on the {report.route} after {waited:.2f} s)"
    )


def echo_destination(destination: DicomDestination, *, calling_ae_title: str) -> float:
    """C-ECHO ``destination``; return the echo's round trip in seconds (association set-up excluded).

    Raises :class:`DeliveryError` worded as for a delivery (unreachable, rejected AE title, TLS).
    """
    assoc, _ = _associate(destination, calling_ae_title, [build_context(Verification)])
    try:
        started = time.perf_counter()
        response = assoc.send_c_echo()
        elapsed = time.perf_counter() - started
    finally:
        if assoc.is_established:
            assoc.release()
    if "Status" not in response:
        raise DeliveryError(
            destination.name,
            f"no C-ECHO response from {_where(destination)} within {destination.dimse_timeout_seconds:g} s",
        )
    status = int(response.Status)
    if status != 0x0000:
        raise DeliveryError(destination.name, f"C-ECHO answered with status 0x{status:04X}", retryable=False)
    return elapsed
