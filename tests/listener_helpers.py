"""Helpers for the listener tests: configs on 127.0.0.1, a running listener, SCU sends, TLS material."""

from __future__ import annotations

import datetime
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset

from listener.completion import SealedStudy
from listener.service import ListenerService
from netrt.config import NetrtConfig, load_config

from .conftest import free_port

LOCALHOST = "127.0.0.1"


def listener_config(data_dir: Path, *, idle: float = 0.6, **listener: Any) -> NetrtConfig:
    """Defaults, data under ``data_dir``, listener on 127.0.0.1 and a free port, short idle time."""
    config = load_config(None)
    config.paths.data_dir = data_dir
    config.listener.host = LOCALHOST
    config.listener.port = free_port()
    config.listener.study_idle_seconds = idle
    for key, value in listener.items():
        setattr(config.listener, key, value)
    return config


@dataclass
class RecordingTrigger:
    """The trigger callback the listener gets; records each call and returns a run id (or fails)."""

    fail_times: int = 0
    calls: list[SealedStudy] = field(default_factory=list)
    snapshots: list[list[str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, study: SealedStudy) -> str:
        with self.lock:
            if self.fail_times > 0:
                self.fail_times -= 1
                raise ConnectionError("Prefect API unreachable (test)")
            self.calls.append(study)
            # What the flow would find when it starts: the sealed folder's files right now.
            self.snapshots.append(sorted(p.name for p in study.folder.iterdir()))
            return f"run-{len(self.calls)}"

    def wait_for(self, count: int, timeout: float = 20.0) -> list[SealedStudy]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.calls) >= count:
                    return list(self.calls)
            time.sleep(0.05)
        raise AssertionError(f"expected {count} flow runs triggered within {timeout} s, got {len(self.calls)}")


@contextmanager
def running_listener(
    config: NetrtConfig, trigger: Callable[[SealedStudy], str], **kwargs: Any
) -> Iterator[ListenerService]:
    service = ListenerService(config, trigger=trigger, **kwargs)
    service.start()
    try:
        yield service
    finally:
        service.stop(grace=1.0)


def dcmtk_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def storescu(
    storescu_path: str,
    port: int,
    folder: Path,
    *,
    calling: str = "STORESCU",
    called: str = "NETRT",
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [storescu_path, "-aet", calling, "-aec", called, "+sd", LOCALHOST, str(port), str(folder)],
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def read(path: Path) -> Dataset:
    return dcmread(path)


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# --- TLS material -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # a client certificate from another CA
    rogue_key: Path


def make_tls_files(folder: Path) -> TlsFiles:
    """A CA, a server certificate for 127.0.0.1, a client certificate, and a client one from a rogue CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return path

    def write_cert(cert: x509.Certificate, path: Path) -> Path:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    def make_ca(common: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(common))
            .issuer_name(name(common))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return key, cert

    def issue(
        ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, common: str, server: bool
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        import ipaddress

        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(common))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address(LOCALHOST)), x509.DNSName("localhost")]
                ),
                critical=False,
            )
        return key, builder.sign(ca_key, hashes.SHA256())

    ca_key, ca_cert = make_ca("NETRT test CA")
    server_key, server_cert = issue(ca_key, ca_cert, "netrt-test-server", server=True)
    client_key, client_cert = issue(ca_key, ca_cert, "netrt-test-client", server=False)
    rogue_ca_key, rogue_ca_cert = make_ca("Rogue CA")
    rogue_key, rogue_cert = issue(rogue_ca_key, rogue_ca_cert, "rogue-client", server=False)
    return TlsFiles(
        ca=write_cert(ca_cert, folder / "ca.pem"),
        server_cert=write_cert(server_cert, folder / "server.pem"),
        server_key=write_key(server_key, folder / "server.key"),
        client_cert=write_cert(client_cert, folder / "client.pem"),
        client_key=write_key(client_key, folder / "client.key"),
        rogue_cert=write_cert(rogue_cert, folder / "rogue.pem"),
        rogue_key=write_key(rogue_key, folder / "rogue.key"),
    )
