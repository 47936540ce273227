"""Subject pose, acquisition grids and the imaging chain (slice profile, EPI distortion, noise, ADC).

Physical space is the scanner's LPS frame. A subject is the template head scaled, rotated,
translated and smoothly deformed: one SimpleITK transform maps scanner points to template points,
and every image and the lesion mask are sampled through it, so they agree in physical space.
Images are simulated at the acquired resolution (slice profile from several sub-slices), carried
as complex data with noise, and interpolated to the reconstructed matrix by k-space zero filling,
as scanners do; the magnitude gives Rician statistics and ADC is computed from the noisy images.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..image import Image
from .anatomy import HeadModel, mni_to_lps, upsample_linear

GAMMA_HZ_PER_T = 42.577e6
DCHI_AIR_TISSUE = 9.4e-6  # susceptibility difference air - tissue (SI, Schenck, Med Phys 1996)
BRAIN_CENTRE_MNI = (0.0, -18.0, 8.0)
BRAIN_Z_RANGE_MNI = (-62.0, 78.0)  # cerebellum floor .. vertex


def rotation(rx: float, ry: float, rz: float) -> np.ndarray:
    """Rotation matrix from angles (degrees) about the LPS x, y, z axes."""
    a, b, c = np.deg2rad([rx, ry, rz])
    mx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    my = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    mz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return mz @ my @ mx


@dataclass
class SubjectPose:
    """Scanner -> template mapping: q = M (p - t_head) + c_t, then q + D(q) (smooth deformation)."""

    matrix: np.ndarray  # M (3x3)
    t_head: np.ndarray  # scanner position of the template's head centre
    c_t: np.ndarray  # template head centre (LPS)
    rot: np.ndarray  # head rotation in the scanner
    scale: np.ndarray  # head size factors (x, y, z)
    transform: sitk.Transform
    max_disp_mm: float
    info: dict = field(default_factory=dict)

    def to_template(self, p: np.ndarray) -> np.ndarray:
        """Affine part only (deformation ignored): scanner -> template points (N, 3)."""
        return (np.atleast_2d(p) - self.t_head) @ self.matrix.T + self.c_t

    def to_scanner(self, q: np.ndarray) -> np.ndarray:
        return (np.atleast_2d(q) - self.c_t) @ np.linalg.inv(self.matrix).T + self.t_head

    @property
    def volume_factor(self) -> float:
        return float(np.prod(self.scale))


def draw_pose(head: HeadModel, rng: np.random.Generator, atrophy: float) -> SubjectPose:
    scale_iso = rng.uniform(0.9, 1.1)
    scale = scale_iso * rng.uniform(0.96, 1.04, 3)
    # Head orientation in the coil: mostly pitch (chin up/down), a little roll and yaw.
    angles = np.array([np.clip(rng.normal(0, 7), -15, 15), np.clip(rng.normal(0, 3), -8, 8), np.clip(rng.normal(0, 3), -8, 8)])
    rot = rotation(*angles)
    c_t = mni_to_lps(BRAIN_CENTRE_MNI)
    t_head = rng.normal(0, 6, 3)
    matrix = np.diag(1.0 / scale) @ rot.T
    aff = sitk.AffineTransform(3)
    aff.SetMatrix(tuple(matrix.ravel()))
    aff.SetTranslation(tuple(c_t - matrix @ t_head))
    # Smooth random displacement on an 8 mm control grid (template space), plus ventricular /
    # central expansion with atrophy (backward mapping: sampling pulled towards the centre).
    g = head.grid
    step = 8.0
    shape = tuple(int(np.ceil(s / step)) + 3 for s in g.shape)  # (z, y, x)
    amp = rng.uniform(1.0, 3.5)
    disp = np.stack([ndimage.gaussian_filter(rng.standard_normal(shape), 1.3) for _ in range(3)], -1)
    disp *= amp / (disp.std() + 1e-9)
    origin = np.asarray(g.origin) - np.asarray(g.direction).reshape(3, 3) @ np.full(3, step)
    zz, yy, xx = np.indices(shape, dtype=float)
    idx = np.stack([xx, yy, zz], -1).reshape(-1, 3) * step
    pts = idx @ np.asarray(g.direction).reshape(3, 3).T + origin
    v_c = mni_to_lps((0.0, -10.0, 12.0))
    rel = pts - v_c
    w = np.exp(-(rel**2).sum(1) / (2 * 28.0**2))
    disp = disp.reshape(-1, 3) - (atrophy * 0.35) * w[:, None] * rel
    max_disp = float(np.abs(disp).max())
    field_img = sitk.GetImageFromArray(disp.reshape(*shape, 3).astype(np.float64), isVector=True)
    field_img.SetSpacing((step,) * 3)
    field_img.SetOrigin(tuple(origin))
    field_img.SetDirection(g.direction)
    dft = sitk.DisplacementFieldTransform(field_img)
    tr = sitk.CompositeTransform([dft, aff])  # applied right to left: affine, then deformation
    info = {"head_scale": [round(float(s), 4) for s in scale], "head_rotation_deg": [round(float(a), 2) for a in angles],
            "deformation_rms_mm": round(float(amp), 2), "atrophy": round(float(atrophy), 3)}
    return SubjectPose(matrix, t_head, c_t, rot, scale, tr, max_disp, info)


@dataclass
class Acquisition:
    """An axial (possibly oblique) 2D multi-slice acquisition and its reconstructed grid."""

    direction: np.ndarray  # 3x3, columns = in-plane x, in-plane y, slice normal
    origin: np.ndarray  # first voxel centre (shared by acquired and reconstructed grids)
    fov: tuple[float, float]  # mm in-plane
    acq_matrix: tuple[int, int]  # (nx, ny) acquired
    recon_matrix: tuple[int, int]  # (nx, ny) reconstructed
    n_slices: int
    thickness: float
    gap: float
    pe_axis: int = 1  # 0 = x (left-right), 1 = y (anterior-posterior)

    @property
    def pitch(self) -> float:
        return self.thickness + self.gap

    @property
    def acq_spacing(self) -> tuple[float, float, float]:
        return (self.fov[0] / self.acq_matrix[0], self.fov[1] / self.acq_matrix[1], self.pitch)

    @property
    def recon_spacing(self) -> tuple[float, float, float]:
        return (self.fov[0] / self.recon_matrix[0], self.fov[1] / self.recon_matrix[1], self.pitch)

    def reference(self, recon: bool = True) -> Image:
        nx, ny = self.recon_matrix if recon else self.acq_matrix
        sp = self.recon_spacing if recon else self.acq_spacing
        return Image(np.zeros((self.n_slices, ny, nx), np.uint8), sp, tuple(self.origin), tuple(self.direction.ravel()))

    def as_dict(self) -> dict:
        return {"fov_mm": [round(f, 2) for f in self.fov], "acquired_matrix": list(self.acq_matrix),
                "reconstructed_matrix": list(self.recon_matrix), "spacing_mm": [round(s, 4) for s in self.recon_spacing],
                "slices": self.n_slices, "slice_thickness_mm": round(self.thickness, 3), "slice_gap_mm": round(self.gap, 3),
                "phase_encode_axis": "LR" if self.pe_axis == 0 else "AP",
                "direction": [round(float(d), 6) for d in self.direction.ravel()],
                "oblique_deg": round(float(np.degrees(np.arccos(np.clip(self.direction[2, 2], -1, 1)))), 2)}


def draw_acquisition(pose: SubjectPose, rng: np.random.Generator, grid: str = "clinical", spacing=None,
                     size=None, thickness=None, tilt_deg=None, kind: str = "dwi") -> Acquisition:
    """Random clinical grid (or an isotropic axial one) placed on the subject's head."""
    if grid not in ("clinical", "iso"):
        raise ValueError(f"grid must be 'clinical' or 'iso', got {grid!r}")
    if grid == "iso":
        sp = float(spacing[0]) if spacing is not None else 2.0
        spacing = (sp, sp, sp)
    # Slice orientation: AC-PC aligned (planned on the localiser) or scanner axial with a tilt.
    if tilt_deg is not None:
        direction = rotation(float(tilt_deg), 0.0, 0.0)
    elif grid == "iso":
        direction = np.eye(3)
    elif rng.random() < 0.6:
        direction = pose.rot @ rotation(*rng.normal(0, 2.5, 3))
    else:
        direction = rotation(rng.uniform(-20, 20) if rng.random() < 0.8 else 0.0, rng.normal(0, 2), rng.normal(0, 2))
    if spacing is not None:
        sx, sy, sz = (float(s) for s in spacing)
    else:
        s_in = rng.uniform(0.9, 2.0) if kind == "dwi" else rng.uniform(0.65, 1.0)
        sx = sy = s_in
        sz = None
    if thickness is not None:
        thk = float(thickness)
    elif grid == "iso":
        thk = sz
    elif sz is not None:
        thk = sz * rng.uniform(0.8, 1.0)
    else:
        thk = rng.uniform(3.0, 6.0) if kind == "dwi" else rng.uniform(3.0, 6.0)
    if sz is None:
        sz = thk * (1.0 + (rng.choice([0.0, 0.1, 0.2, 0.3]) if rng.random() < 0.7 else 0.0))
    gap = max(0.0, sz - thk)
    if size is not None:
        nx, ny, nz = (int(s) for s in size)
    else:
        fov = rng.uniform(220, 250)
        lim = (128, 256) if kind == "dwi" else (192, 384)
        nx = ny = int(np.clip(round(fov / sx / 2) * 2, *lim)) if grid == "clinical" else int(round(fov / sx))
        # Technologists cover the brain (110-175 mm) within the 20-40 slices a protocol allows.
        nz = int(np.clip(round(rng.uniform(110, 175) / sz), 20, 40)) if grid == "clinical" \
            else int(np.ceil(150 * np.mean(pose.scale) / sz))
    fov = (nx * sx, ny * sy)
    # Acquired (k-space) matrix: EPI is acquired at ~1.6-2.4 mm and zero-fill interpolated.
    if kind == "dwi":
        acq_sp = max(sx, rng.uniform(1.5, 2.4)) if grid == "clinical" else sx
    else:
        acq_sp = max(sx, rng.uniform(0.8, 1.1)) if grid == "clinical" else sx
    ax = int(min(nx, max(32, round(fov[0] / acq_sp / 2) * 2)))
    ay = int(min(ny, max(32, round(fov[1] / acq_sp / 2) * 2)))
    # Stack position: centre on the brain, partial coverage cuts the vertex or the cerebellum.
    zlo, zhi = BRAIN_Z_RANGE_MNI
    mid_t = mni_to_lps((BRAIN_CENTRE_MNI[0], BRAIN_CENTRE_MNI[1], (zlo + zhi) / 2))
    mid = pose.to_scanner(mid_t)[0]
    height = (zhi - zlo) * float(np.mean(pose.scale))
    cover = nz * sz
    slack = abs(height - cover) / 2
    dz = rng.uniform(-1, 1) * slack * 0.9 + rng.normal(0, 6)
    if grid == "iso" or size is not None:
        dz = rng.normal(0, 3)
    centre = mid + direction[:, 2] * dz + direction[:, :2] @ rng.normal(0, 5, 2)
    half = np.array([(nx - 1) * sx, (ny - 1) * sy, (nz - 1) * sz]) / 2
    # Both grids share the first voxel centre (zero-filling keeps sample 0 in place).
    origin = centre - direction @ half
    pe_axis = 1 if (rng.random() < 0.85 or kind != "dwi") else 0
    return Acquisition(direction, origin, fov, (ax, ay), (nx, ny), nz, thk, gap, pe_axis)


def template_crop(head: HeadModel, pose: SubjectPose, ref: Image, extra_mm: float) -> tuple[slice, slice, slice]:
    """Template index box that covers the grid ``ref`` (plus slice profile and deformation)."""
    pts = ref.corners()
    n = ref.direction_matrix[:, 2]
    pts = np.concatenate([pts + n * extra_mm, pts - n * extra_mm])
    q = pose.to_template(pts)
    idx = head.grid.physical_to_index(q)  # (x, y, z)
    m = pose.max_disp_mm + 3
    hb = head.head_bbox[::-1]  # (x, y, z) slices: nothing outside the head has signal
    lo = np.maximum(np.floor(idx.min(0) - m).astype(int), [s.start for s in hb])
    hi = np.minimum(np.ceil(idx.max(0) + m).astype(int) + 1, [s.stop for s in hb])
    hi = np.maximum(hi, lo + 1)
    return (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))


def slice_profile(thickness: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Slice profile as sub-slice offsets (mm along the normal), weights and a through-plane blur
    (sigma, mm, applied to the template maps): two Gaussians at +-T/4 of sigma T/6.9 give a
    flat-topped profile with the variance of a T-wide box (T^2/12) and soft edges that reach into
    the neighbouring slices, as real RF excitation profiles do, at the cost of two resamplings."""
    t = float(thickness)
    return np.array([-t / 4, t / 4]), np.array([0.5, 0.5]), t / 6.9


def sample_on_grid(maps: list[np.ndarray], crop, head: HeadModel, pose: SubjectPose, ref: Image,
                   offsets: np.ndarray, weights: np.ndarray, linear: bool = True) -> list[np.ndarray]:
    """Weighted average over sub-slices of template maps resampled onto ``ref`` through the pose."""
    start = (crop[0].start, crop[1].start, crop[2].start)
    srcs = [head.grid.sitk_image(m, start) for m in maps]
    n = ref.direction_matrix[:, 2]
    outs = [np.zeros(ref.array.shape, np.float32) for _ in maps]
    interp = sitk.sitkLinear if linear else sitk.sitkNearestNeighbor
    for u, w in zip(offsets, weights):
        r = sitk.Image(*ref.size, sitk.sitkUInt8)
        r.SetSpacing(ref.spacing)
        r.SetOrigin(tuple(np.asarray(ref.origin) + n * u))
        r.SetDirection(ref.direction)
        for src, out in zip(srcs, outs):
            res = sitk.Resample(src, r, pose.transform, interp, 0.0, sitk.sitkFloat32)
            out += np.float32(w) * sitk.GetArrayViewFromImage(res)
    return outs


# -- susceptibility --------------------------------------------------------------------------


def field_map_hz(points: np.ndarray, pose: SubjectPose, b0_t: float, pneumatisation: float,
                 pockets: list) -> np.ndarray:
    """Off-resonance (Hz) of the air spaces, each a cluster of small spheres: outside a sphere the
    field is a dipole, dB/B0 = (dchi/3) (R/r)^3 (3 cos^2 theta - 1), with B0 along scanner z; inside,
    the (Lorentz-corrected) field is uniform. Pneumatisation scales the air volume."""
    pts = np.asarray(points, np.float32)
    f = np.zeros(len(pts), np.float32)
    scale = float(np.mean(pose.scale))
    k = np.float32(DCHI_AIR_TISSUE / 3.0 * GAMMA_HZ_PER_T * b0_t)
    for centre, extent, spheres in pockets:
        c = pose.to_scanner(np.asarray(centre)[None])[0].astype(np.float32)
        d = pts - c
        near = np.flatnonzero(np.einsum("ij,ij->i", d, d) < (extent * scale + 40.0) ** 2)
        if near.size == 0:
            continue
        p = pts[near]
        acc = np.zeros(near.size, np.float32)
        centres = pose.to_scanner(spheres[:, :3]).astype(np.float32)
        for cs, r in zip(centres, spheres[:, 3] * scale * pneumatisation ** (1 / 3)):
            rel = p - cs
            r2 = np.einsum("ij,ij->i", rel, rel)
            out = r2 >= r * r
            r2 = np.maximum(r2, r * r)
            acc += np.float32(r**3) * (3 * rel[:, 2] ** 2 / r2 - 1) / r2**1.5 * out
        f[near] += k * acc
    return f


def _grid_points(ref: Image) -> np.ndarray:
    nz, ny, nx = ref.array.shape
    k, j, i = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    return ref.index_to_physical(np.stack([i.ravel(), j.ravel(), k.ravel()], 1))


def _upsample_inplane(a: np.ndarray, shape) -> np.ndarray:
    return upsample_linear(a, (1, 2, 2), shape)


def epi_distortion(images: list[np.ndarray], ref: Image, acq: Acquisition, pose: SubjectPose, b0_t: float,
                   rng: np.random.Generator, pockets: list) -> tuple[list[np.ndarray], dict]:
    """Geometric distortion along the phase-encode axis (signal pile-up and stretching, by
    forward-mapping intensities), plus intravoxel dephasing from through-slice field gradients."""
    pneu = rng.uniform(0.5, 1.3)  # air volume factor: sinus/mastoid aeration varies a lot between people
    bw_pe = rng.uniform(12.0, 35.0)  # Hz per pixel along phase encoding (echo spacing x matrix / accel.)
    tau = rng.uniform(0.001, 0.006)  # s of effective dephasing (SE-EPI refocuses static dephasing at TE)
    polarity = float(rng.choice([-1.0, 1.0]))
    # The field is smooth away from the air: evaluate it on every second pixel in plane.
    shape = ref.array.shape
    coarse = Image(np.zeros((shape[0], (shape[1] + 1) // 2 + 1, (shape[2] + 1) // 2 + 1), np.uint8),
                   (ref.spacing[0] * 2, ref.spacing[1] * 2, ref.spacing[2]), ref.origin, ref.direction)
    pts = _grid_points(coarse)
    n = ref.direction_matrix[:, 2]
    cshape = coarse.array.shape
    f_c = field_map_hz(pts, pose, b0_t, pneu, pockets).reshape(cshape)
    dfdz_c = ((field_map_hz(pts + n, pose, b0_t, pneu, pockets) - field_map_hz(pts - n, pose, b0_t, pneu, pockets)) / 2.0).reshape(cshape)
    f = _upsample_inplane(f_c, shape)
    dfdz = _upsample_inplane(dfdz_c, shape)
    atten = np.abs(np.sinc(dfdz * acq.thickness * tau)).astype(np.float32)
    # Pixel shift along PE; tissue right at an air boundary (mucosa, bone) would move absurdly far
    # in the idealised sphere model, so large shifts saturate (real maxima are ~5-15 pixels).
    s_max = rng.uniform(4.0, 10.0)
    shift = s_max * np.tanh(polarity * f / bw_pe / s_max)
    ax = 2 if acq.pe_axis == 0 else 1
    npe = shape[ax]
    coords = np.indices(shape, dtype=np.float32)
    target = coords[ax] + shift.astype(np.float32)
    i0 = np.floor(target).astype(np.int64)
    w1 = (target - i0).astype(np.float32)
    outs = []
    for img in images:
        acc = np.zeros(img.size, np.float32)
        val = img * atten
        for off, w in ((0, 1.0 - w1), (1, w1)):
            t = i0 + off
            ok = (t >= 0) & (t < npe)
            idx = [coords[0].astype(np.int64), coords[1].astype(np.int64), coords[2].astype(np.int64)]
            idx[ax] = t
            flat = np.ravel_multi_index([a[ok] for a in idx], shape)
            acc += np.bincount(flat, weights=(val * w)[ok], minlength=img.size).astype(np.float32)
        outs.append(acc.reshape(shape))
    info = {"pe_bandwidth_hz_per_px": round(float(bw_pe), 2), "max_shift_px": round(float(np.abs(shift).max()), 2),
            "pneumatisation": round(float(pneu), 3)}
    return outs, info


def bias_field(shape, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Smooth multiplicative receive-coil / B1 field: low-order polynomial in normalised coordinates."""
    nz, ny, nx = shape
    z = np.linspace(-1, 1, nz, dtype=np.float32)[:, None, None]
    y = np.linspace(-1, 1, ny, dtype=np.float32)[None, :, None]
    x = np.linspace(-1, 1, nx, dtype=np.float32)[None, None, :]
    c = rng.normal(0, strength, 9)
    r2 = x**2 + y**2
    logb = c[0] * x + c[1] * y + c[2] * z * 0.5 + c[3] * x * y + c[4] * (x**2 - y**2) + c[5] * r2 + c[6] * x * z * 0.5 + c[7] * y * z * 0.5 + c[8] * z**2 * 0.3
    return np.exp(logb).astype(np.float32)


def reconstruct(signal: np.ndarray, sigma: float, acq: Acquisition, rng: np.random.Generator, ghost: float,
                t2star_blur: float = 0.0, shift_px: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Add complex Gaussian noise at the acquired resolution, filter and zero-fill k-space to the
    reconstructed matrix, and take the magnitude: Rician statistics, mild Gibbs ringing, correlated
    noise, as on scanner images. ``t2star_blur`` is the signal decay across the EPI echo train
    (fraction lost at the k-space edge along phase encoding); ``shift_px`` (y, x) a sub-pixel
    translation (eddy currents / motion between acquisitions), applied as a k-space phase ramp."""
    z = signal.astype(np.complex64)
    pe = 2 if acq.pe_axis == 0 else 1
    if ghost > 0:  # EPI Nyquist (N/2) ghost along phase encoding
        z += np.float32(ghost) * np.roll(signal, signal.shape[pe] // 2, axis=pe) * np.complex64(np.exp(1j * 0.7))
    z += (rng.standard_normal(z.shape, dtype=np.float32) + 1j * rng.standard_normal(z.shape, dtype=np.float32)) * np.float32(sigma)
    k = np.fft.fftshift(np.fft.fft2(z, axes=(1, 2)), axes=(1, 2))
    ny, nx = z.shape[1:]
    ky = (np.arange(ny) - ny // 2) / (ny / 2)
    kx = (np.arange(nx) - nx // 2) / (nx / 2)
    # Fermi apodisation (standard on scanners against ringing), plus T2* decay along PE.
    fy = 1 / (1 + np.exp((np.abs(ky) - 0.9) / 0.04))
    fx = 1 / (1 + np.exp((np.abs(kx) - 0.9) / 0.04))
    decay = np.exp(-t2star_blur * np.abs(ky if pe == 1 else kx))
    if pe == 1:
        fy = fy * decay
    else:
        fx = fx * decay
    filt = (fy[:, None] * fx[None, :]).astype(np.complex64)
    if shift_px[0] or shift_px[1]:
        fy_c = (np.arange(ny) - ny // 2) / ny
        fx_c = (np.arange(nx) - nx // 2) / nx
        filt *= np.exp(-2j * np.pi * (fy_c[:, None] * shift_px[0] + fx_c[None, :] * shift_px[1])).astype(np.complex64)
    k *= filt
    rx, ry = acq.recon_matrix
    out = np.zeros((z.shape[0], ry, rx), np.complex64)
    oy, ox = ry // 2 - ny // 2, rx // 2 - nx // 2
    out[:, oy : oy + ny, ox : ox + nx] = k
    img = np.fft.ifft2(np.fft.ifftshift(out, axes=(1, 2)), axes=(1, 2)) * np.float32(rx * ry / (nx * ny))
    return np.abs(img).astype(np.float32)


def adc_map(b0: np.ndarray, dwi: np.ndarray, b: float, threshold: float, adc_max: float = 5000.0) -> np.ndarray:
    """Scanner-style ADC in 1e-6 mm^2/s: ln(S0/Sb)/b, clipped, zero where b0 is background."""
    with np.errstate(divide="ignore", invalid="ignore"):
        adc = np.log(np.maximum(b0, 1e-6) / np.maximum(dwi, 1e-6)) / b * 1e6
    adc = np.clip(np.nan_to_num(adc, nan=0.0, posinf=adc_max), 0, adc_max)
    adc[b0 < threshold] = 0.0
    return adc.astype(np.float32)
