"""Frame-to-frame rigid motion correction of a 4D series (SimpleITK registration).

Each frame is registered to a reference frame, starting from the previous frame's transform
(patients drift, so the neighbouring frame is the best first guess). The metric is normalised
correlation, which the contrast bolus (a global rise in CT, a global drop in MR) barely moves,
on intensity-clipped copies averaged down to ~4 mm (then ~2 mm) pixels; only frames that
actually moved are resampled (CT: only their change from the reference, the contrast, not the anatomy).

A perfusion slab of a few thick slices (or any series of >= 4 mm slices): rotations about the
in-plane axes and through-plane shifts are not recoverable from it (the anatomy that moved out of
a slice is gone), so it is registered in-plane only (rotation about the slice normal + in-plane shift), on its
slice-averaged image, which is also 10-50x cheaper. Whole-brain series get a full 3D rigid fit.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import SimpleITK as sitk

from ..errors import Cancelled, InputError
from ..image import Image

ProgressFn = Callable[[float, str], None]
THIN_SLAB_MM = 60.0
THICK_SLICE_MM = 4.0  # slices this thick carry no usable through-plane detail for registration
# CT intensities for registration: the whole head, air to bone, with metal and dense bone capped.
# The scalp/air outline and the skull/brain boundary carry the pose; the bolus adds a few HU to
# tissue and ~100-500 HU to a few vessel voxels, which the correlation barely notices. The skull
# alone (> 150 HU) is thin, sparse rings: a weak, many-minima metric that missed in-plane
# rotations of ~2 degrees (residual 4 mm at the head's edge on CTP phantoms, 0.2 mm with this window).
CT_REGISTRATION_HU = (-1000.0, 1300.0)


@dataclass
class MotionResult:
    series: Image
    displacement_mm: list[float]  # per frame, max over the corners of the head's bounding box
    matrices: list[list[float]] = field(default_factory=list)  # per frame: 3x3 matrix + translation (12)
    corrected_frames: int = 0
    mode: str = "3d"

    @property
    def max_displacement_mm(self) -> float:
        return float(max(self.displacement_mm)) if self.displacement_mm else 0.0


def _block_mean(arr: np.ndarray, shrink: tuple[int, int, int]) -> np.ndarray:
    """Average (z, y, x) blocks of ``shrink`` (x, y, z) voxels: downsampling without aliasing."""
    sx, sy, sz = shrink
    z, y, x = (d // s * s for d, s in zip(arr.shape, (sz, sy, sx)))
    a = arr[:z, :y, :x]
    return a.reshape(z // sz, sz, y // sy, sy, x // sx, sx).mean(axis=(1, 3, 5))


def _copy_3d(frame: Image, clip: tuple[float, float] | None, shrink: tuple[int, int, int]) -> sitk.Image:
    arr = frame.array.astype(np.float32)
    if clip is not None:
        arr = np.clip(arr, clip[0], clip[1])
    small = _block_mean(arr, shrink)
    # The centre of block 0 sits at continuous index (s - 1) / 2 of the full grid.
    origin = frame.index_to_physical(np.array([(s - 1) / 2.0 for s in shrink]))[0]
    spacing = tuple(sp * s for sp, s in zip(frame.spacing, shrink))
    return Image(np.ascontiguousarray(small, dtype=np.float32), spacing, tuple(origin), frame.direction).to_sitk()


def _copy_2d(frame: Image, clip: tuple[float, float] | None, shrink: tuple[int, int, int]) -> sitk.Image:
    """Slice-averaged image in the slab's own in-plane frame (mm along the row/column axes)."""
    arr = frame.array.astype(np.float32)
    if clip is not None:
        arr = np.clip(arr, clip[0], clip[1])
    small = _block_mean(arr.mean(axis=0, keepdims=True), (shrink[0], shrink[1], 1))[0]
    img = sitk.GetImageFromArray(np.ascontiguousarray(small))
    img.SetSpacing((frame.spacing[0] * shrink[0], frame.spacing[1] * shrink[1]))
    img.SetOrigin(((shrink[0] - 1) / 2.0 * frame.spacing[0], (shrink[1] - 1) / 2.0 * frame.spacing[1]))
    return img


def _method(mask: sitk.Image | None) -> sitk.ImageRegistrationMethod:
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsCorrelation()
    if mask is not None:
        reg.SetMetricFixedMask(mask)
    reg.SetMetricSamplingStrategy(reg.REGULAR)
    reg.SetMetricSamplingPercentage(0.5, 1234)
    reg.SetInterpolator(sitk.sitkLinear)
    return reg


def _metric(fixed: sitk.Image, moving: sitk.Image, mask: sitk.Image | None, tx: sitk.Transform) -> float:
    reg = _method(mask)
    reg.SetInitialTransform(tx, inPlace=False)
    return float(reg.MetricEvaluate(fixed, moving))


def _register(fixed: sitk.Image, moving: sitk.Image, mask: sitk.Image | None, init: sitk.Transform,
              step: float, iterations: int, relax: float) -> sitk.Transform:
    """Optimise from ``init``, then keep whichever of the result, ``init`` and no motion matches
    best: a noisy frame or the bolus can send the optimiser off, never make things worse."""
    reg = _method(mask)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=step, minStep=0.01 if relax < 0.6 else 0.005,
                                                 numberOfIterations=iterations, relaxationFactor=relax,
                                                 gradientMagnitudeTolerance=1e-8)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetInitialTransform(init, inPlace=False)
    tx = reg.Execute(fixed, moving)
    if tx.GetName() == "CompositeTransform":
        tx = sitk.CompositeTransform(tx).GetNthTransform(0)
    tx = type(init)(tx)
    identity = type(init)(init)
    identity.SetIdentity()
    candidates = [tx, type(init)(init), identity]
    scores = [_metric(fixed, moving, mask, c) for c in candidates]
    return candidates[int(np.argmin(scores))]


def inplane_rigid(angle: float, translation, centre, geometry: Image) -> sitk.AffineTransform:
    """A rigid transform in the slab's own in-plane frame (rotation ``angle`` rad about the slice
    normal through ``centre``, then ``translation``; both in mm along the row/column axes, from
    the first voxel centre) as a 3D physical transform: T(P) = D R D^T (P - C) + C + D t, with D
    the direction matrix (columns = row, column, normal axes)."""
    d = geometry.direction_matrix
    c, s = np.cos(angle), np.sin(angle)
    r = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    centre_phys = np.asarray(geometry.origin) + d @ np.array([float(centre[0]), float(centre[1]), 0.0])
    out = sitk.AffineTransform(3)
    out.SetMatrix(tuple((d @ r @ d.T).ravel()))
    out.SetCenter(tuple(centre_phys))
    out.SetTranslation(tuple(d @ np.array([float(translation[0]), float(translation[1]), 0.0])))
    return out


def _slab_to_physical(t2: sitk.Euler2DTransform, series: Image) -> sitk.AffineTransform:
    return inplane_rigid(t2.GetAngle(), t2.GetTranslation(), t2.GetCenter(), series)


def _mapped(tx: sitk.Transform, corners: np.ndarray) -> np.ndarray:
    return np.array([tx.TransformPoint(tuple(float(c) for c in p)) for p in corners])


def _max_displacement(tx: sitk.Transform, corners: np.ndarray) -> float:
    return float(np.max(np.linalg.norm(_mapped(tx, corners) - corners, axis=1)))


def _moved_between(a: sitk.Transform, b: sitk.Transform, corners: np.ndarray) -> float:
    return float(np.max(np.linalg.norm(_mapped(a, corners) - _mapped(b, corners), axis=1)))


def _inside(ones: sitk.Image, ref: sitk.Image, tx: sitk.Transform) -> np.ndarray:
    """Reference voxels whose point under ``tx`` lies within the field of view (``ones``)."""
    return sitk.GetArrayFromImage(sitk.Resample(ones, ref, tx, sitk.sitkNearestNeighbor, 0)) > 0


def _as_affine(tx: sitk.Transform) -> list[float]:
    m = np.asarray(tx.GetMatrix()).reshape(3, 3)
    centre, trans = np.asarray(tx.GetCenter()), np.asarray(tx.GetTranslation())
    offset = trans + centre - m @ centre  # T(P) = M P + offset
    return [float(v) for v in (*m.ravel(), *offset)]


def _resample_change(frame: sitk.Image, ref: sitk.Image, ones: sitk.Image, phys: sitk.Transform,
                     unmoved: np.ndarray) -> np.ndarray:
    """Frame ``frame`` brought onto the reference pose through ``phys`` (reference -> frame
    points), resampling only what changed since the reference.

    The static anatomy (skull, CSF and grey/white edges of tens to hundreds of HU) is taken from
    the reference itself; only the frame minus the reference moved into the frame's pose (the
    contrast, a few HU, smooth) is interpolated back. Resampling the whole frame instead leaves
    interpolation residue at every anatomical edge that the baseline subtraction turns into fake
    concentration, in the moved frames only: a step in every curve, which raises the flow of
    low-flow tissue (the core) most."""
    inv = phys.GetInverse()
    ref_there = sitk.GetArrayFromImage(sitk.Resample(ref, ref, inv, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    # Where the reference does not reach (moved in from outside its field of view) no change is known.
    change = np.where(_inside(ones, ref, inv), sitk.GetArrayFromImage(sitk.Cast(frame, sitk.sitkFloat32)) - ref_there, 0.0)
    change_img = sitk.GetImageFromArray(change.astype(np.float32))
    change_img.CopyInformation(ref)
    back = sitk.GetArrayFromImage(sitk.Resample(change_img, ref, phys, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    # Voxels that came from outside the field of view keep their own (unmoved) value.
    return np.where(_inside(ones, ref, phys), sitk.GetArrayFromImage(ref) + back, unmoved)


@dataclass
class _Registration:
    """Fixed images, masks and geometry of one series' registrations (two resolution levels)."""

    series: Image
    clip: tuple[float, float] | None
    thin: bool
    levels: list[tuple[int, int, int]]
    fixed: list[sitk.Image]
    masks: list[sitk.Image | None]
    corners: np.ndarray  # of the head's bounding box (LPS mm), for displacements
    start: sitk.Transform  # identity, centred on the head

    @classmethod
    def build(cls, series: Image, clip, head_mask, reference: int) -> "_Registration":
        spacing = np.asarray(series.spacing)
        # ~4 mm then ~2 mm pixels in-plane: plenty for a rigid fit, 4-20x fewer samples.
        levels = [tuple(int(max(1, np.floor(mm / s))) if i < 2 else 1 for i, s in enumerate(spacing)) for mm in (4.0, 2.0)]
        thin = (series.size[2] * spacing[2] < THIN_SLAB_MM or spacing[2] >= THICK_SLICE_MM
                or spacing[2] > 2.5 * spacing[:2].max())
        if head_mask is not None and head_mask.any():
            zz, yy, xx = np.nonzero(head_mask)
            lo, hi = np.array([xx.min(), yy.min(), zz.min()]), np.array([xx.max(), yy.max(), zz.max()])
            mask_img = Image(head_mask.astype(np.float32), series.spacing, series.origin, series.direction)
        else:
            lo, hi = np.zeros(3), np.asarray(series.size) - 1
            mask_img = None
        corners = series.index_to_physical(
            np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])], float))
        copy = _copy_2d if thin else _copy_3d
        fixed = [copy(series.frame(reference), clip, sh) for sh in levels]
        masks = [sitk.Cast(copy(mask_img, None, sh) > 0.5, sitk.sitkUInt8) if mask_img is not None else None for sh in levels]
        if thin:
            start: sitk.Transform = sitk.Euler2DTransform()
            start.SetCenter(tuple((lo[:2] + hi[:2]) / 2.0 * spacing[:2]))  # box centre in the slab frame
        else:
            start = sitk.Euler3DTransform()
            start.SetCenter(tuple(corners.mean(axis=0)))
        return cls(series, clip, thin, levels, fixed, masks, corners, start)

    def copy(self, frame: Image, level: int) -> sitk.Image:
        return (_copy_2d if self.thin else _copy_3d)(frame, self.clip, self.levels[level])

    def physical(self, tx: sitk.Transform) -> sitk.Transform:
        return _slab_to_physical(tx, self.series) if self.thin else tx

    def fit(self, frame: Image, init: sitk.Transform, min_correct_mm: float) -> tuple[sitk.Transform, sitk.Transform]:
        """(transform in the registration frame, as a physical transform). Coarse: a quick fit
        (most frames have not moved). Fine: only frames that moved, with a slower step
        relaxation so that small rotations, weakly constrained next to the translations, still
        get steps once the translation has settled."""
        tx = _register(self.fixed[0], self.copy(frame, 0), self.masks[0], init, 1.0, 50, 0.5)
        phys = self.physical(tx)
        if _max_displacement(phys, self.corners) >= min_correct_mm and self.levels[1] != self.levels[0]:
            tx = _register(self.fixed[1], self.copy(frame, 1), self.masks[1], tx, 0.5, 40, 0.7)
            phys = self.physical(tx)
        if _moved_between(self.physical(init), phys, self.corners) >= min_correct_mm:
            # A motion event (the head moved since the previous frame): the first fit started far
            # off and its step shrank on the way, typically leaving a rotation half found (~2 mm at
            # the head's edge), which the following frames then inherit as their start. Restarting
            # from the result, with the step reset, finishes it.
            level = 1 if self.levels[1] != self.levels[0] else 0
            tx = _register(self.fixed[level], self.copy(frame, level), self.masks[level], tx, 0.5, 40, 0.7)
            phys = self.physical(tx)
        return tx, phys


def correct_motion(
    series: Image,
    *,
    clip: tuple[float, float] | None,
    head_mask: np.ndarray | None = None,
    reference: int = 0,
    max_displacement_mm: float = 10.0,
    min_correct_mm: float = 0.5,
    resample_change: bool = False,
    where: str | None = None,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
) -> MotionResult:
    """Register every frame to ``reference``; raises InputError when a frame moved more than
    ``max_displacement_mm`` (beyond what a rigid correction can undo). ``resample_change``: for
    additive contrast (CT, in HU), resample only each moved frame's change from the reference (see
    ``_resample_change``); MR's contrast is a signal drop proportional to the anatomy, whose
    change carries the anatomy's edges anyway, so whole frames are resampled there."""
    report = progress or (lambda f, m: None)
    reg = _Registration.build(series, clip, head_mask, reference)
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    if reg.thin:
        # A 2D slab image is a few thousand pixels: ITK's thread pool costs more than it saves
        # (2-4x slower with 2 threads on a busy 2-core machine). The metric follows the global
        # default, so that is lowered for the duration of the loop.
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    n = series.array.shape[0]
    out = series.array.astype(np.float32, copy=True)
    disp = [0.0] * n
    mats: list[list[float]] = [[1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0, 0, 0, 0]] * n
    corrected = 0
    ref_img = sitk.Cast(series.frame(reference).to_sitk(), sitk.sitkFloat32)
    ones = sitk.Image(ref_img.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(ref_img)
    last = reg.start
    try:
        for k in range(n):
            if cancel is not None and cancel.is_set():
                raise Cancelled("perfusion: cancelled during motion correction")
            report(k / n, f"motion correction: frame {k + 1}/{n}")
            if k == reference:
                continue
            frame = series.frame(k)
            try:
                tx, phys = reg.fit(frame, last, min_correct_mm)
            except RuntimeError as exc:
                raise InputError(where, f"motion correction failed at frame {k + 1} ({str(exc).strip().splitlines()[-1][:80]})") from None
            d = _max_displacement(phys, reg.corners)
            if d > max_displacement_mm:
                raise InputError(where, f"motion beyond correction: frame {k + 1} moved {d:.1f} mm "
                                        f"(limit {max_displacement_mm:g} mm)")
            disp[k] = d
            mats[k] = _as_affine(phys)
            last = tx
            if d >= min_correct_mm:
                if resample_change:
                    out[k] = _resample_change(frame.to_sitk(), ref_img, ones, phys, out[k])
                else:
                    res = sitk.Resample(frame.to_sitk(), ref_img, phys, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
                    # Voxels that came from outside the field of view keep their own (unmoved) value.
                    out[k] = np.where(_inside(ones, ref_img, phys), sitk.GetArrayFromImage(res), out[k])
                corrected += 1
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    report(1.0, "motion correction done")
    return MotionResult(series.with_array(out), disp, mats, corrected, "in-plane" if reg.thin else "3d")
