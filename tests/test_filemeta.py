"""NETRT's own File Meta Information encoder (:mod:`netrt.filemeta`) writes pydicom's bytes."""

from __future__ import annotations

import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian

from netrt.filemeta import PREAMBLE, encode_file_meta, file_meta_bytes


def _pydicom_bytes(meta: FileMetaDataset) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_file_meta_info(buffer, meta, enforce_standard=True)
    return PREAMBLE + buffer.getvalue()


def _meta(instance: str, version_name: str = "NETRT_0.1.0") -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.1"
    meta.ImplementationVersionName = version_name
    return meta


INSTANCES = ["1.2.3", "1.2.34", "1.2.826.0.1.3680043.8.498.12345678901234567890", "2.25." + "9" * 59]


@pytest.mark.parametrize("instance", INSTANCES)
@pytest.mark.parametrize("version_name", ["NETRT_0.1.0", "PYNETDICOM_304", "X"])
def test_the_bytes_are_pydicoms(instance: str, version_name: str) -> None:
    meta = _meta(instance, version_name)
    expected = _pydicom_bytes(_meta(instance, version_name))
    assert encode_file_meta(meta) == expected
    assert encode_file_meta(meta, preamble=False) == expected[len(PREAMBLE) :]
    assert (
        file_meta_bytes(
            "1.2.840.10008.5.1.4.1.1.2", instance, ExplicitVRLittleEndian, "1.2.826.0.1.3680043.8.498.1", version_name
        )
        == expected
    )


def test_anything_else_is_left_to_pydicom() -> None:
    meta = _meta("1.2.3")
    meta.SourceApplicationEntityTitle = "NETRT"
    assert encode_file_meta(meta) is None  # an element it does not write
    assert encode_file_meta(_meta("1.2.3", "")) is None  # an empty version name
    odd = _meta("1.2.3")
    odd.FileMetaInformationVersion = b"\x00\x02"
    assert encode_file_meta(odd) is None
    assert file_meta_bytes("1.2.3", "not a uid", ExplicitVRLittleEndian, "1.2", "V") is None
    assert file_meta_bytes("1.2.3", "1.2.3", ExplicitVRLittleEndian, "1.2", "a name far too long") is None
