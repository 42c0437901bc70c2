"""Keys of the processing settings: what makes written output differ, hashed.

A key feeds the output UIDs (same study + same settings -> same UIDs, so a re-send overwrites
instead of duplicating) and the cache keys of the flow's deterministic steps. The base key covers
what shapes every output (ROI selection, reformat spacing, series naming) and NETRT's version;
options that only one kind reads (overlay groups, the colour series' disclaimer and fill) enter
only that kind's key, and which kinds are made (``outputs``, ``burn_in``) enters none: adding SEG
to a config must not give the overlay series new UIDs.
"""

from __future__ import annotations

import hashlib
import json

from netrt import __version__
from netrt.config import ProcessingConfig

PLANE_NUMBER = {"axial": 1, "coronal": 2, "sagittal": 3}

#: Processing keys that do not shape every output: excluded from the base key.
_KIND_OPTIONS = {"images_without_rtstruct", "outputs", "burn_in", "overlay_groups", "disclaimer", "color_fill_opacity"}


def settings_key(processing: ProcessingConfig) -> str:
    """A short hash of the settings every written output depends on, plus the code version."""
    shaping = processing.model_dump(mode="json", exclude=_KIND_OPTIONS)
    if shaping.get("structure_sets") == "latest":
        # the default, what NETRT did before the key existed: its outputs keep the UIDs they had
        del shaping["structure_sets"]
    payload = json.dumps({"processing": shaping, "netrt": __version__}, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def kind_settings_key(processing: ProcessingConfig, kind: str, *options: object) -> str:
    """The key of one output kind: the base key, the kind, and the options only it reads."""
    payload = json.dumps([settings_key(processing), kind, *options], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]
