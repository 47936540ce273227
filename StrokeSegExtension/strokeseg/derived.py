"""Extra input channels computed from a case's own inputs, as a model card's ``derived_channels`` says.

Runs inside :func:`strokeseg.preprocess.prepare`, on the model grid after normalisation, so that
training (whose cached volumes are made by ``prepare``) and inference see the same channels.
Each entry of the card's list names a ``kind`` registered here; the channels it makes are
appended after the inputs, in list order, and the network's ``in_channels`` counts them.

``mirror`` (paper 001, Clèrigues et al. 2019, "symmetric modality augmentation")::

    {"kind": "mirror", "of": ["dwi", "adc"], "register_on": "dwi", "register": "rigid"}

Each listed input is flipped left-right (array axis x of the LPS-ordered model grid), the
flipped ``register_on`` image is registered rigidly (SimpleITK, mean squares, centre-of-mass
initialisation) to the unflipped one, and every flipped input is resampled with that transform:
a voxel of the ``<key>_mirror`` channel holds the intensity of its mirror point across the
head's own mid-sagittal plane, not across the middle of the image box. ``"register": "none"``
keeps the plain flip. Other kinds register with :func:`register_kind`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import SimpleITK as sitk

from .errors import ModelError
from .image import Image

DerivedFn = Callable[[Mapping[str, np.ndarray], Image, Mapping[str, Any]], dict[str, np.ndarray]]
_KINDS: dict[str, DerivedFn] = {}


def register_kind(name: str) -> Callable[[DerivedFn], DerivedFn]:
    """Decorator: ``fn(channels, grid, spec) -> {new channel name: (z, y, x) array}``."""

    def deco(fn: DerivedFn) -> DerivedFn:
        _KINDS[name] = fn
        return fn

    return deco


def known_kinds() -> list[str]:
    return sorted(_KINDS)


def derived_names(specs: Sequence[Mapping[str, Any]] | None) -> list[str]:
    """Names of the channels ``specs`` add, without computing them (for channel counting)."""
    out: list[str] = []
    for spec in specs or []:
        if spec.get("kind") == "mirror":
            out += [f"{k}_mirror" for k in _keys(spec)]
        else:
            out += [f"{k}_{spec.get('kind')}" for k in _keys(spec)]
    return out


def derive_channels(channels: Mapping[str, np.ndarray], grid: Image,
                    specs: Sequence[Mapping[str, Any]] | None) -> dict[str, np.ndarray]:
    """All derived channels of a card for one case, in card order (name -> (z, y, x) float32)."""
    out: dict[str, np.ndarray] = {}
    for spec in specs or []:
        kind = spec.get("kind")
        if kind not in _KINDS:
            raise ModelError(f"unknown derived channel kind '{kind}' (known: {', '.join(known_kinds())})")
        missing = [k for k in _keys(spec) if k not in channels]
        if missing:
            raise ModelError(f"derived channel '{kind}' needs input(s) {', '.join(missing)} the model does not take")
        out.update(_KINDS[kind](channels, grid, spec))
    return out


def _keys(spec: Mapping[str, Any]) -> list[str]:
    of = spec.get("of", [])
    return [of] if isinstance(of, str) else list(of)


# -- mirror ---------------------------------------------------------------------------------


def _on_grid(array: np.ndarray, grid: Image) -> sitk.Image:
    img = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    img.SetSpacing(tuple(float(s) for s in grid.spacing))
    img.SetOrigin(tuple(float(o) for o in grid.origin))
    img.SetDirection(tuple(float(d) for d in np.asarray(grid.direction).ravel()))
    return img


def mid_sagittal_transform(array: np.ndarray, grid: Image, *, iterations: int = 60, seed: int = 7) -> sitk.Transform:
    """Rigid transform mapping the original image's points to the left-right flipped image's:
    resampling the flipped image with it puts each voxel's mirror partner (across the head's
    mid-sagittal plane) on that voxel."""
    fixed = _on_grid(array, grid)
    moving = _on_grid(array[:, :, ::-1], grid)
    init = sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(),
                                             sitk.CenteredTransformInitializerFilter.MOMENTS)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMeanSquares()
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.25, seed)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-3, numberOfIterations=int(iterations),
                                                 relaxationFactor=0.6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2.0, 1.0, 0.0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    reg.SetInitialTransform(init, inPlace=False)
    try:
        return reg.Execute(fixed, moving)
    except RuntimeError:  # a degenerate image (e.g. constant): the centre-of-mass alignment alone
        return init


@register_kind("mirror")
def mirror_channels(channels: Mapping[str, np.ndarray], grid: Image, spec: Mapping[str, Any]) -> dict[str, np.ndarray]:
    keys = _keys(spec)
    if not keys:
        raise ModelError("derived channel 'mirror' needs 'of': the input(s) to mirror")
    on = spec.get("register_on", keys[0])
    if on not in channels:
        raise ModelError(f"derived channel 'mirror': register_on '{on}' is not an input of the model")
    how = spec.get("register", "rigid")
    if how not in ("rigid", "none"):
        raise ModelError(f"derived channel 'mirror': register must be 'rigid' or 'none', got '{how}'")
    out = {}
    if how == "none":
        for k in keys:
            out[f"{k}_mirror"] = np.ascontiguousarray(channels[k][:, :, ::-1], dtype=np.float32)
        return out
    transform = mid_sagittal_transform(channels[on], grid, iterations=int(spec.get("iterations", 60)))
    reference = _on_grid(channels[on], grid)
    for k in keys:
        flipped = _on_grid(channels[k][:, :, ::-1], grid)
        fill = float(np.min(channels[k])) if channels[k].size else 0.0  # background, not the mean
        res = sitk.Resample(flipped, reference, transform, sitk.sitkLinear, fill, sitk.sitkFloat32)
        out[f"{k}_mirror"] = sitk.GetArrayFromImage(res).astype(np.float32)
    return out


# -- 4D inputs: reduction over time ---------------------------------------------------------
#
# A model may take a 4D series (``ctp``, ``pwi``) as an input channel when its card says how
# to collapse time, e.g. ``"temporal_reduction": {"ctp": "max"}`` (paper 004: the maximum of the
# 4D CTP over time, ISLES 2018's "PWI max"). The reduction runs in ``prepare`` before the
# resampling to the model grid, on the series' own spatial grid, and the result is normalised
# with the card's ``normalisation[key]`` like any input: a user with the raw series runs the
# model from the card alone, whatever software made the perfusion maps.

TEMPORAL_METHODS = ("max", "mean")


def temporal_reduction(image: Image, method: str) -> Image:
    """(t, z, y, x) series -> (z, y, x) image on the series' spatial grid (float32)."""
    if method not in TEMPORAL_METHODS:
        raise ModelError(f"unknown temporal reduction '{method}' (known: {', '.join(TEMPORAL_METHODS)})")
    if not image.is_4d:
        raise ModelError(f"temporal reduction '{method}' needs a 4D series, got a 3D image")
    a = image.array
    out = a.max(axis=0) if method == "max" else a.mean(axis=0, dtype=np.float64)
    frame = image.frame(0)
    return frame.with_array(np.asarray(out, dtype=np.float32), derived=f"temporal {method} of a 4D series")
