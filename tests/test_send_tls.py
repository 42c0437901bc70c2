"""C-STORE and C-ECHO over TLS to an Orthanc that requires a client certificate.

A throwaway CA signs Orthanc's server certificate (subjectAltName IP 127.0.0.1) and NETRT's client
certificate; a second CA signs nothing either side trusts. Orthanc runs with DICOM TLS on and
``DicomTlsRemoteCertificateRequired``, inside a private network namespace (tests/orthanc.py).
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from netrt.config import DicomDestination
from netrt.errors import DeliveryError
from netrt.send import echo_destination, send_to_dicom

from .orthanc import Orthanc, OrthancSettings, run_in_namespace
from .test_send import written  # noqa: F401  (module fixture: the pipeline's series)

Key = ec.EllipticCurvePrivateKey


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _certificate(
    subject: str, key: Key, issuer: tuple[str, Key] | None, *, ca: bool = False, ip: str | None = None
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = (subject, key) if issuer is None else issuer
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    if ip is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(folder: Path, stem: str, certificate: x509.Certificate, key: Key) -> tuple[Path, Path]:
    cert_path, key_path = folder / f"{stem}.crt", folder / f"{stem}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("pki")
    ca_key, other_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("NETRT test CA", ca_key, None, ca=True)
    other = _certificate("Some other CA", other_key, None, ca=True)
    server_key, client_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    server = _certificate("orthanc", server_key, ("NETRT test CA", ca_key), ip="127.0.0.1")
    client = _certificate("netrt", client_key, ("NETRT test CA", ca_key))
    paths = {
        "ca": _write(folder, "ca", ca, ca_key)[0],
        "other_ca": _write(folder, "other-ca", other, other_key)[0],
    }
    paths["server_cert"], paths["server_key"] = _write(folder, "server", server, server_key)
    paths["client_cert"], paths["client_key"] = _write(folder, "client", client, client_key)
    return {name: str(path) for name, path in paths.items()}


def _scenario_tls(params: dict[str, Any]) -> dict[str, Any]:
    pki, files = params["pki"], [Path(f) for f in params["files"]]
    settings = OrthancSettings(
        root=Path(params["root"]),
        options={
            "DicomTlsEnabled": True,
            "DicomTlsCertificate": pki["server_cert"],
            "DicomTlsPrivateKey": pki["server_key"],
            "DicomTlsTrustedCertificates": pki["ca"],
            "DicomTlsRemoteCertificateRequired": True,
        },
    )
    base = {"name": "secure-pacs", "type": "dicom", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242}
    client = {"certfile": pki["client_cert"], "keyfile": pki["client_key"]}

    def destination(**tls: Any) -> DicomDestination:
        return DicomDestination(**base, tls={"enabled": True, **tls})

    def attempt(target: DicomDestination) -> dict[str, Any]:
        try:
            outcome = send_to_dicom(target, files, calling_ae_title="NETRT")
        except DeliveryError as exc:
            return {"ok": False, "message": str(exc), "retryable": exc.retryable}
        return {"ok": True, "sent": outcome.stored}

    out: dict[str, Any] = {}
    with Orthanc(settings, quick_stop=True) as orthanc:
        out["echo_seconds"] = echo_destination(destination(ca_file=pki["ca"], **client), calling_ae_title="NETRT")
        out["good"] = attempt(destination(ca_file=pki["ca"], **client))
        out["count"] = orthanc.statistics()["CountInstances"]
        out["untrusted_server"] = attempt(destination(ca_file=pki["other_ca"], **client))
        out["no_client_certificate"] = attempt(destination(ca_file=pki["ca"]))
        out["plain"] = attempt(DicomDestination(**base, connect_timeout_seconds=2, acse_timeout_seconds=2))
    return out


def test_tls_with_client_certificate(pki: dict[str, str], written: dict[str, Any], tmp_path: Path) -> None:  # noqa: F811
    files = written["files"][:10]
    result = run_in_namespace(_scenario_tls, {"pki": pki, "files": files, "root": str(tmp_path / "orthanc")}, tmp_path)
    assert result["echo_seconds"] > 0
    assert result["good"] == {"ok": True, "sent": 10}
    assert result["count"] == 10

    untrusted = result["untrusted_server"]
    assert not untrusted["ok"] and untrusted["retryable"] is False
    assert "certificate" in untrusted["message"] and "not accepted" in untrusted["message"]
    assert "destination 'secure-pacs'" in untrusted["message"]

    # Orthanc requires a client certificate: without one nothing is stored and the attempt fails.
    missing = result["no_client_certificate"]
    assert not missing["ok"] and missing["retryable"] is False
    assert "destination 'secure-pacs'" in missing["message"] and "CERTIFICATE_REQUIRED" in missing["message"]
    # Plain DICOM to a TLS port fails too, naming the destination.
    plain = result["plain"]
    assert not plain["ok"] and "destination 'secure-pacs'" in plain["message"]
