"""The disclaimer in burn-in series (issue 17 part 6): burned in there, never into overlay series
or the source pixels, and no other pixel re-quantised."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from netrt.burnin import outline
from netrt.config import DEFAULT_DISCLAIMER, ProcessingConfig
from netrt.outputs.text import disclaimer_masks
from netrt.phantom import PhantomSpec, write_phantom
from netrt.pipeline import compute_mask, load_mask, write_output
from netrt.study import find_study, load_found_study


@pytest.fixture(scope="module")
def study_and_masks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, Path]:
    root = tmp_path_factory.mktemp("burn")
    write_phantom(PhantomSpec(rows=96, columns=96, pixel_spacing=(2.0, 2.0), slice_spacing=3.0, slices=30), root / "p")
    found = find_study(root / "p" / "dicom", None)
    study = load_found_study(root / "p" / "dicom", found.study_instance_uid)
    return study, compute_mask(study, ProcessingConfig(), root / "work"), root


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(pydicom.dcmread(path).pixel_array)


def test_burn_in_carries_the_disclaimer_and_keeps_every_other_pixel(study_and_masks: tuple[Any, Any, Path]) -> None:
    study, masks, root = study_and_masks
    processing = ProcessingConfig(outputs=["overlay", "burn_in"])
    (burned,) = write_output(study, masks, "burn_in", "axial", processing, root / "a")
    (plain,) = write_output(study, masks, "overlay", "axial", processing, root / "a")
    quiet = ProcessingConfig(outputs=["overlay", "burn_in"], disclaimer="")
    (no_text,) = write_output(study, masks, "burn_in", "axial", quiet, root / "b")
    assert burned.series_instance_uid != no_text.series_instance_uid, "the disclaimer is part of the UID key"

    merged = load_mask(masks.mask_path)
    fill, stroke = disclaimer_masks(96, 96, DEFAULT_DISCLAIMER)
    assert fill.sum() > 100 and stroke.sum() > 100
    for index, (k, source) in enumerate(zip(study.images.slice_indices, study.images.files, strict=True)):
        original = _pixels(source)
        with_text, without = _pixels(burned.files[index]), _pixels(no_text.files[index])
        edge = outline(merged[k])
        untouched = ~(edge | fill | stroke)
        assert np.array_equal(with_text[untouched], original[untouched]), "no other pixel re-quantised"
        assert np.array_equal(without[~edge], original[~edge])
        assert (with_text[fill] > original.max() - 1).all(), "letters at the burn value (brightest)"
        assert (with_text[stroke & ~edge] == with_text.min()).all(), "their outline at the lowest stored value"
        # The overlay series never carries the text: its pixels are the source's, byte for byte.
        assert pydicom.dcmread(plain.files[index]).PixelData == pydicom.dcmread(source).PixelData


def test_reformatted_burn_in_carries_the_disclaimer(study_and_masks: tuple[Any, Any, Path]) -> None:
    study, masks, root = study_and_masks
    (with_text,) = write_output(study, masks, "burn_in", "coronal", ProcessingConfig(), root / "c")
    (without,) = write_output(study, masks, "burn_in", "coronal", ProcessingConfig(disclaimer=""), root / "d")
    first = _pixels(with_text.files[len(with_text.files) // 2])
    fill, stroke = disclaimer_masks(*first.shape, DEFAULT_DISCLAIMER)
    other = _pixels(without.files[len(without.files) // 2])
    assert fill.any() and (first[fill] != other[fill]).mean() > 0.9
    assert np.array_equal(first[~(fill | stroke)], other[~(fill | stroke)]), "only the text differs"
