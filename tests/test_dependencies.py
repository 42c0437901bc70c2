"""The dependency traps of the design: the dataclasses backport and opencv's libGL build stay out,
and a Prefect flow really runs against a local server (the backport made every flow time out)."""

from __future__ import annotations

import dataclasses
import importlib.metadata as metadata
import sys

import pytest


def test_dataclasses_is_the_standard_library() -> None:
    assert dataclasses.__file__ is not None
    assert "site-packages" not in dataclasses.__file__
    with pytest.raises(metadata.PackageNotFoundError):
        metadata.version("dataclasses")


def test_opencv_is_the_headless_build() -> None:
    import cv2  # rt-utils imports it; the libGL build would fail to import on servers

    assert metadata.version("opencv-python-headless")
    with pytest.raises(metadata.PackageNotFoundError):
        metadata.version("opencv-python")
    assert cv2.__version__


def test_rt_utils_imports() -> None:
    import rt_utils

    assert hasattr(rt_utils, "RTStructBuilder")
    assert "rt_utils" in sys.modules


@pytest.mark.slow
def test_a_flow_runs_on_the_test_server(prefect_harness: None) -> None:
    from prefect import flow, task

    @task
    def double(x: int) -> int:
        return 2 * x

    @flow
    def tiny(x: int) -> int:
        return double(x) + 1

    assert tiny(20) == 41
