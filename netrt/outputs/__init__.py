"""Output kinds: the derived series NETRT writes for a study, one module per kind.

Today: :mod:`netrt.outputs.rois` (what every kind knows about the kept ROIs, and their per-ROI
masks); the kinds themselves move here one by one (issue 17).
"""
