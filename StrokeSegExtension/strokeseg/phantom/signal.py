"""Compatibility alias of :mod:`strokeseg.phantom.mr_signal` (renamed: ``signal`` shadows the
standard library module when a script runs from this folder). Import from ``mr_signal``."""

from .mr_signal import B_VALUE, TISSUES, Contrast, TissueParams, draw_tissue_params, signal_maps

__all__ = ["B_VALUE", "TISSUES", "Contrast", "TissueParams", "draw_tissue_params", "signal_maps"]
