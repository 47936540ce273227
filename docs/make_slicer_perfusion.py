"""Render docs/slicer_perfusion.png: StrokeSeg's perfusion maps as the clinician sees them in Slicer.

Headless (PyPI slicer-core): a CT perfusion phantom's 4D series is written as a ``.seq.nrrd`` by
Slicer's volume sequence storage node, loaded through the Sequences logic, and run through the
StrokeSeg logic's perfusion path (maps, core/penumbra segments, statistics table). Two axial
slices through the hypoperfused tissue are rendered by Slicer's own slice pipeline
(``vtkMRMLSliceLogic``: the CBF and Tmax volumes with the colour maps and windows the module gives
them); the core and penumbra outlines are the segments, exported to a label map and resliced by
the same slice logic, drawn in the segments' colours.

    python docs/make_slicer_perfusion.py [--out docs/slicer_perfusion.png] [--seed 6]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "StrokeSegExtension"))

from slice_view import axial_view, view_rgba  # noqa: E402 (docs/, beside this script)

SOOP_LESIONS = REPO_ROOT.parent / "shared" / "data" / "soop" / "lesions"
LABELS = {"penumbra": 2, "core": 1}  # drawing order: the core outline on top


class SliceRenderer:
    """Slicer's slice pipeline for one axial view (one "Red" slice node per scene): a map as background,
    a label map resliced alongside."""

    def __init__(self, ctx, label, size: int = 360) -> None:
        self.logic = axial_view(ctx, size)
        self.composite = self.logic.GetSliceCompositeNode()
        self.composite.SetBackgroundVolumeID(label.GetID())
        self.composite.SetLabelVolumeID(label.GetID())
        self.composite.SetLabelOpacity(0.0)  # the outlines are drawn from the resliced labels below
        self.logic.FitSliceToAll()

    def render(self, background, offset: float) -> tuple[np.ndarray, np.ndarray]:
        """(RGBA of the view, label value of each view pixel) with this background volume at this
        offset (mm along the slice normal), rows top to bottom."""
        from vtk.util import numpy_support

        self.composite.SetBackgroundVolumeID(background.GetID())
        rgba = view_rgba(self.logic, offset)
        reslice = self.logic.GetLabelLayer().GetReslice()
        reslice.Update()
        labels = reslice.GetOutput()
        lx, ly, _ = labels.GetDimensions()
        values = numpy_support.vtk_to_numpy(labels.GetPointData().GetScalars()).reshape(ly, lx, -1)[::-1, :, 0]
        return rgba, values.copy()


def colormap(volume):
    """The volume's Slicer colour node as a matplotlib colormap, with its display window (for a colour bar)."""
    from matplotlib.colors import ListedColormap

    display = volume.GetDisplayNode()
    lut = display.GetColorNode().GetScalarsToColors()
    lo, hi = lut.GetRange()
    rgb = [0.0, 0.0, 0.0]
    colors = []
    for v in np.linspace(lo, hi, 256):
        lut.GetColor(float(v), rgb)
        colors.append(tuple(rgb))
    return ListedColormap(colors), display.GetWindowLevelMin(), display.GetWindowLevelMax()


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "slicer_perfusion.png")
    parser.add_argument("--seed", type=int, default=6)
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patheffects as pe
    import matplotlib.pyplot as plt
    import slicer

    from strokeseg.phantom.perfusion import simulate_perfusion
    from StrokeSegLib.headless import create_context, write_sequence
    from StrokeSegLib.logic import StrokeSegLogic
    from StrokeSegLib.perfusion import UNITS_ATTRIBUTE
    from StrokeSegLib.segmentation import managed_segments, read_mask
    from StrokeSegLib.terminology import TERMS
    from StrokeSegLib.volumes import add_sequence_from_image, add_volume_from_image, image_from_volume, ijk_to_ras

    library = SOOP_LESIONS if SOOP_LESIONS.is_dir() else None
    with tempfile.TemporaryDirectory() as tmp:
        case = simulate_perfusion(args.seed, "ctp", library, "test" if library else None, motion=False, lesion=True,
                                  compute_maps=False)
        ctx = create_context(Path(tmp) / "cache")
        series_file = write_sequence(add_sequence_from_image(slicer.vtkMRMLScene(), case.images["ctp"], "ctp"),
                                     Path(tmp) / "ctp.seq.nrrd")
        ctx.load_sequence(series_file, "CT perfusion")
        logic = StrokeSegLogic(ctx.scene)
        logic.detect_inputs()
        logic.perfusion.compute()
        report = logic.perfusion.update_statistics()
        p = logic.params
        cbf, tmax = p.perfusionCbf, p.perfusionTmax

        # The core and penumbra segments as one label map on the maps' grid (what the outlines show).
        labels = np.zeros(cbf.GetImageData().GetDimensions()[::-1], np.uint8)
        for role, value in LABELS.items():
            for segment_id in managed_segments(p.perfusionSegmentation, role):
                labels[read_mask(p.perfusionSegmentation, segment_id, cbf) > 0] = value
        label = add_volume_from_image(ctx.scene, image_from_volume(cbf).with_array(labels), "perfusion labels",
                                      reference=cbf, class_name="vtkMRMLLabelMapVolumeNode")

        # Two axial slices with the most hypoperfused tissue, in anatomical order.
        area = (labels > 0).reshape(labels.shape[0], -1).sum(1)
        ks = sorted(int(k) for k in np.argsort(-area)[:2])
        matrix = ijk_to_ras(cbf)
        centre = np.array([(n - 1) / 2 for n in cbf.GetImageData().GetDimensions()])
        offsets = [float((matrix @ np.array([centre[0], centre[1], k, 1.0]))[2]) for k in ks]
        renderer = SliceRenderer(ctx, label)
        views = {key: ([renderer.render(node, o) for o in offsets], colormap(node), node.GetAttribute(UNITS_ATTRIBUTE))
                 for key, node in (("CBF", cbf), ("Tmax", tmax))}
        truth_core = float(case.info["core_ml"])
        truth_hypo = float(case.info["hypoperfusion_ml"])

    # Crop every view to the head (the non-black part of the CBF views) with a small margin.
    head = np.zeros(views["CBF"][0][0][0].shape[:2], bool)
    for rgba, _ in views["CBF"][0]:
        head |= rgba[..., :3].max(-1) > 0
    rows, cols = np.nonzero(head) if head.any() else np.nonzero(np.ones_like(head))
    crop = (slice(max(rows.min() - 8, 0), rows.max() + 9), slice(max(cols.min() - 8, 0), cols.max() + 9))

    fig, axes = plt.subplots(len(ks), 2, figsize=(7.4, 3.3 * len(ks) + 0.9), squeeze=False, layout="constrained")
    outline = [pe.Stroke(linewidth=3.2, foreground="black"), pe.Normal()]
    for col, (key, (panels, (cmap, lo, hi), unit)) in enumerate(views.items()):
        for row, ((rgba, values), k) in enumerate(zip(panels, ks)):
            ax = axes[row][col]
            ax.imshow(rgba[crop][..., :3])
            for role, value in LABELS.items():
                if np.any(values[crop] == value):
                    ax.contour((values[crop] == value).astype(float), levels=[0.5], colors=[TERMS[role].color],
                               linewidths=1.6).set(path_effects=outline)
            ax.set_title(f"{key} ({unit}), axial slice {k}", fontsize=9)
            ax.axis("off")
        bar = plt.cm.ScalarMappable(cmap=cmap, norm=matplotlib.colors.Normalize(lo, hi))
        fig.colorbar(bar, ax=[axes[r][col] for r in range(len(ks))], shrink=0.6).set_label(unit, fontsize=8)
    handles = [matplotlib.lines.Line2D([], [], color=TERMS[r].color, lw=2.5, path_effects=outline, label=TERMS[r].name)
               for r in LABELS]
    fig.legend(handles=handles, loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(
        "Slicer slice views (headless): CT perfusion phantom, CBF and Tmax with core and penumbra outlines\n"
        f"core {report['core_ml']:.1f} mL (truth {truth_core:.1f}), hypoperfused (Tmax > 6 s) "
        f"{report['hypoperfusion_ml']:.1f} mL (truth {truth_hypo:.1f}), mismatch ratio "
        f"{report['mismatch_ratio'] if report['mismatch_ratio'] is not None else 'n/a'}", fontsize=9)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main()
