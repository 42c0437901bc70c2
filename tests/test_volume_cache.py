"""The decoded source volume shared by the output writers (:mod:`netrt.study.volume_cache`).

It is remembered state: each test makes it lie in one way (a source file changed under it, a torn
cache file, a file of another shape) and checks that the values handed out are still those of the
files as they are now.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from pydicom import dcmread

import netrt.study.volume_cache as cache_module
from netrt.phantom import PhantomSpec, write_phantom
from netrt.study import LoadedStudy, load_study, read_source_image
from netrt.study.volume_cache import source_volume, volume_key

SPEC = PhantomSpec(rows=48, columns=48, pixel_spacing=(2.0, 2.0), slice_spacing=3.0, slices=12)


def _study(root: Path) -> LoadedStudy:
    manifest = write_phantom(SPEC, root)
    return load_study([*manifest.image_files, manifest.rtstruct_file])


def _decoded_here(values: np.ndarray) -> bool:
    """True for the buffer of an image just decoded, False for values read from the cache file."""
    return isinstance(values.base, cache_module._ImageBuffer)


def _decoded(study: LoadedStudy) -> np.ndarray:
    return sitk.GetArrayFromImage(read_source_image(study.images))


def test_the_second_reader_gets_the_stored_values(tmp_path: Path) -> None:
    study = _study(tmp_path / "phantom")
    first = source_volume(study.images, tmp_path / "cache")
    assert _decoded_here(first)  # decoded here: the SimpleITK image's buffer, then stored
    stored = list((tmp_path / "cache").glob("volume-*.npy"))
    assert [p.name for p in stored] == [f"volume-{volume_key(study.images)}.npy"]
    # while a writer holds the volume, another one in this process gets the same array (not a copy)
    assert source_volume(study.images, tmp_path / "cache") is first
    kept = first.copy()
    assert not first.flags.writeable
    del first
    second = source_volume(study.images, tmp_path / "cache")
    assert not _decoded_here(second)  # read from the file
    assert not second.flags.writeable
    np.testing.assert_array_equal(second, kept)
    np.testing.assert_array_equal(second, _decoded(study))
    assert second.dtype == np.int16


def test_a_source_file_changed_after_storing_is_decoded_again(tmp_path: Path) -> None:
    study = _study(tmp_path / "phantom")
    source_volume(study.images, tmp_path / "cache")
    old_key = volume_key(study.images)
    path = study.images.files[3]
    ds = dcmread(path)
    pixels = ds.pixel_array.copy()
    pixels[10, 10] += 77
    ds.PixelData = pixels.tobytes()
    ds.save_as(path)  # same size, new content
    assert volume_key(study.images) != old_key
    values = source_volume(study.images, tmp_path / "cache")
    np.testing.assert_array_equal(values, _decoded(study))
    assert [p.name for p in (tmp_path / "cache").glob("volume-*.npy")] == [f"volume-{volume_key(study.images)}.npy"]
    # touching a file (same bytes, new mtime) is a change too: never trusted on the bytes alone
    now = os.stat(path)
    os.utime(path, ns=(now.st_atime_ns, now.st_mtime_ns + 1_000_000))
    assert volume_key(study.images) != old_key


@pytest.mark.parametrize("damage", ["torn", "other shape", "other type"])
def test_a_damaged_cache_file_is_ignored(tmp_path: Path, damage: str) -> None:
    study = _study(tmp_path / "phantom")
    source_volume(study.images, tmp_path / "cache")
    (stored,) = (tmp_path / "cache").glob("volume-*.npy")
    if damage == "torn":
        stored.write_bytes(stored.read_bytes()[: stored.stat().st_size // 2])
    elif damage == "other shape":
        np.save(stored, np.zeros((2, 2, 2), dtype=np.int16))
    else:
        np.save(stored, np.zeros(study.images.geometry.shape, dtype=np.uint8))
    values = source_volume(study.images, tmp_path / "cache")
    assert _decoded_here(values)  # decoded again, not read
    np.testing.assert_array_equal(values, _decoded(study))
    del values
    reread = source_volume(study.images, tmp_path / "cache")
    assert not _decoded_here(reread)
    np.testing.assert_array_equal(reread, _decoded(study))


def test_concurrent_writers_decode_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    study = _study(tmp_path / "phantom")
    calls: list[int] = []
    real = cache_module.read_source_image

    def counted(series: object) -> sitk.Image:
        calls.append(1)
        return real(series)  # type: ignore[arg-type]

    monkeypatch.setattr(cache_module, "read_source_image", counted)
    results: list[np.ndarray] = []
    barrier = threading.Barrier(4)

    def reader() -> None:
        barrier.wait(timeout=30)
        results.append(np.array(source_volume(study.images, tmp_path / "cache")))

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(results) == 4
    assert len(calls) == 1
    for values in results:
        np.testing.assert_array_equal(values, results[0])


def test_without_a_cache_folder_nothing_is_written(tmp_path: Path) -> None:
    study = _study(tmp_path / "phantom")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    values = source_volume(study.images, None)
    np.testing.assert_array_equal(values, _decoded(study))
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
