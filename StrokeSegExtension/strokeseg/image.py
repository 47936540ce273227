"""The engine's image type: a voxel array together with its physical geometry.

Conventions are SimpleITK's (and so DICOM's): physical coordinates in LPS millimetres,
``spacing``/``origin`` in (x, y, z) order, ``direction`` a row-major 3x3 matrix whose
columns are the index axes, and the array in (z, y, x) index order. A 4D series keeps
its time axis first, (t, z, y, x), with 3D spatial geometry and the frame times in
``meta["times"]`` (seconds). Every resampling goes through this geometry.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import SimpleITK as sitk

Vec3 = tuple[float, float, float]


@dataclass
class Image:
    array: np.ndarray
    spacing: Vec3
    origin: Vec3 = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.spacing = tuple(float(s) for s in self.spacing)  # type: ignore[assignment]
        self.origin = tuple(float(o) for o in self.origin)  # type: ignore[assignment]
        self.direction = tuple(float(d) for d in self.direction)
        if len(self.spacing) != 3 or len(self.origin) != 3 or len(self.direction) != 9:
            raise ValueError("Image geometry must be 3D: spacing/origin of 3, direction of 9")
        if self.array.ndim not in (3, 4):
            raise ValueError(f"Image array must be 3D or 4D, got {self.array.ndim}D")

    # -- shape -------------------------------------------------------------------------
    @property
    def is_4d(self) -> bool:
        return self.array.ndim == 4

    @property
    def size(self) -> tuple[int, int, int]:
        """Spatial size in (x, y, z) order, as SimpleITK reports it."""
        z, y, x = self.array.shape[-3:]
        return (x, y, z)

    @property
    def voxel_volume_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    # -- geometry ----------------------------------------------------------------------
    def index_to_physical(self, ijk: np.ndarray) -> np.ndarray:
        """(N, 3) continuous indices in (x, y, z) order -> (N, 3) LPS points in mm."""
        ijk = np.atleast_2d(np.asarray(ijk, dtype=float))
        m = self.direction_matrix * np.asarray(self.spacing)[None, :]
        return ijk @ m.T + np.asarray(self.origin)[None, :]

    def physical_to_index(self, points: np.ndarray) -> np.ndarray:
        points = np.atleast_2d(np.asarray(points, dtype=float))
        m = self.direction_matrix * np.asarray(self.spacing)[None, :]
        return (points - np.asarray(self.origin)[None, :]) @ np.linalg.inv(m).T

    def corners(self) -> np.ndarray:
        """The 8 physical corners of the voxel-edge bounding box (LPS mm)."""
        sx, sy, sz = self.size
        idx = np.array([[i, j, k] for i in (-0.5, sx - 0.5) for j in (-0.5, sy - 0.5) for k in (-0.5, sz - 0.5)])
        return self.index_to_physical(idx)

    def same_grid(self, other: "Image", tol: float = 1e-4) -> bool:
        return (
            self.size == other.size
            and np.allclose(self.spacing, other.spacing, atol=tol)
            and np.allclose(self.origin, other.origin, atol=tol * 10)
            and np.allclose(self.direction, other.direction, atol=tol)
        )

    def with_array(self, array: np.ndarray, **meta: Any) -> "Image":
        """Same geometry, new voxels (spatial shape must match)."""
        if array.shape[-3:] != self.array.shape[-3:]:
            raise ValueError(f"array shape {array.shape} does not fit grid {self.array.shape[-3:]}")
        return replace(self, array=array, meta={**self.meta, **meta})

    def frame(self, t: int) -> "Image":
        """One time point of a 4D series as a 3D image."""
        if not self.is_4d:
            raise ValueError("frame() needs a 4D image")
        meta = {k: v for k, v in self.meta.items() if k != "times"}
        return Image(self.array[t], self.spacing, self.origin, self.direction, meta)

    # -- SimpleITK ---------------------------------------------------------------------
    def to_sitk(self) -> sitk.Image:
        if self.is_4d:
            frames = [self.frame(t).to_sitk() for t in range(self.array.shape[0])]
            t0, dt = _time_axis(self.meta.get("times"), len(frames))
            return sitk.JoinSeries(frames, t0, dt)
        arr = self.array
        # SimpleITK has no bool or float16 pixel type.
        if arr.dtype == np.bool_:
            arr = arr.astype(np.uint8)
        elif arr.dtype == np.float16:
            arr = arr.astype(np.float32)
        img = sitk.GetImageFromArray(np.ascontiguousarray(arr))
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin)
        img.SetDirection(self.direction)
        return img

    @classmethod
    def from_sitk(cls, img: sitk.Image, meta: dict[str, Any] | None = None) -> "Image":
        meta = dict(meta or {})
        dim = img.GetDimension()
        arr = sitk.GetArrayFromImage(img)
        if img.GetNumberOfComponentsPerPixel() > 1:
            raise ValueError("vector (multi-component) images are not supported")
        if dim == 3:
            return cls(arr, img.GetSpacing(), img.GetOrigin(), img.GetDirection(), meta)
        if dim == 4:
            d4 = np.asarray(img.GetDirection()).reshape(4, 4)
            sp = img.GetSpacing()
            meta.setdefault("times", [float(img.GetOrigin()[3] + t * sp[3]) for t in range(img.GetSize()[3])])
            return cls(arr, sp[:3], img.GetOrigin()[:3], tuple(d4[:3, :3].ravel()), meta)
        if dim == 5 and img.GetSize()[3] == 1:
            # ISLES'17/'18 4D PWI files are (x, y, z, 1, t): drop the singleton axis.
            size = list(img.GetSize())
            size[3] = 0
            return cls.from_sitk(sitk.Extract(img, size, [0] * 5), meta)
        if dim == 2:
            # A single slice: treat as a 3D volume one voxel thick.
            d2 = np.asarray(img.GetDirection()).reshape(2, 2)
            direction = np.eye(3)
            direction[:2, :2] = d2
            return cls(arr[None], (*img.GetSpacing(), 1.0), (*img.GetOrigin(), 0.0), tuple(direction.ravel()), meta)
        raise ValueError(f"{dim}D images are not supported")


def _time_axis(times: Any, n: int) -> tuple[float, float]:
    """(first time, step) for SimpleITK's 4th axis; (0, 1) when times are absent or uneven."""
    if times is None or len(times) != n:
        return 0.0, 1.0
    t = np.asarray(times, dtype=float)
    if n < 2 or not np.all(np.isfinite(t)):
        return (float(t[0]) if n and np.isfinite(t[0]) else 0.0), 1.0
    steps = np.diff(t)
    if steps[0] > 0 and np.allclose(steps, steps[0], rtol=1e-3, atol=1e-6):
        return float(t[0]), float(steps[0])
    return 0.0, 1.0  # uneven sampling cannot be stored as spacing; meta["times"] keeps it


def resample_to(image: Image, reference: Image, *, linear: bool = True, default: float = 0.0) -> Image:
    """Resample ``image`` onto ``reference``'s grid through physical space (SimpleITK).

    A 4D series is resampled frame by frame and keeps its time axis.
    """
    if image.is_4d:
        frames = [resample_to(image.frame(t), reference, linear=linear, default=default).array
                  for t in range(image.array.shape[0])]
        return Image(np.stack(frames), reference.spacing, reference.origin, reference.direction, dict(image.meta))
    interp = sitk.sitkLinear if linear else sitk.sitkNearestNeighbor
    src = image.to_sitk()
    ref = sitk.Image(*reference.size, sitk.sitkUInt8)
    ref.SetSpacing(reference.spacing)
    ref.SetOrigin(reference.origin)
    ref.SetDirection(reference.direction)
    out = sitk.Resample(src, ref, sitk.Transform(), interp, default, src.GetPixelID())
    return Image.from_sitk(out, meta=dict(image.meta))


def grid_with_spacing(image: Image, spacing: Vec3) -> Image:
    """An empty image covering the same physical box as ``image`` at a new spacing, same direction."""
    old_sp = np.asarray(image.spacing)
    new_sp = np.asarray(spacing, dtype=float)
    old_size = np.asarray(image.size)
    new_size = np.maximum(1, np.round(old_sp * old_size / new_sp)).astype(int)
    # Keep the box centre (the extent changes by at most half a new voxel on each side).
    centre = image.index_to_physical(((old_size - 1) / 2.0)[None])[0]
    origin = centre - image.direction_matrix @ (new_sp * (new_size - 1) / 2.0)
    arr = np.zeros(tuple(new_size[::-1]), dtype=np.uint8)
    return Image(arr, tuple(new_sp), tuple(origin), image.direction)
