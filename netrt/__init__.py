"""NETRT: the pure domain of a DICOM node for radiotherapy research.

Modules here are plain typed functions and small dataclasses; none imports Prefect, ``flows`` or
``listener`` (only :mod:`netrt.cli` wires them together).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("netrt")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"
