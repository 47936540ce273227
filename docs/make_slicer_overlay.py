"""Render docs/slicer_overlay.png: what the clinician sees in Slicer's slice views.

Headless (PyPI slicer-core): a DWI phantom is loaded through Slicer's volumes logic, segmented by
the StrokeSeg logic with the bundled model, and three axial slices are rendered by Slicer's own
slice pipeline (``vtkMRMLSliceLogic``: DWI background, the probability map as coloured foreground
at the module's opacity, the lesion segment exported to a label layer drawn as an outline).

    python docs/make_slicer_overlay.py [--out docs/slicer_overlay.png] [--seed 6]

``--synthetic`` uses the phantom's smoothed truth as probability map instead of the network
(for trying the rendering without a bundled model; the picture says so).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "StrokeSegExtension"))
sys.path.insert(0, str(REPO_ROOT / "Testing" / "Python"))

from slice_view import axial_view, view_rgba  # noqa: E402 (docs/, beside this script)

SOOP_LESIONS = REPO_ROOT.parent / "shared" / "data" / "soop" / "lesions"


class SliceRenderer:
    """Slicer's slice pipeline for one axial view: background, foreground at an opacity, label outline."""

    def __init__(self, ctx, background, foreground, label, opacity: float, size: int = 320) -> None:
        self.logic = axial_view(ctx, size)
        self.logic.GetSliceNode().SetUseLabelOutline(True)
        composite = self.logic.GetSliceCompositeNode()
        composite.SetBackgroundVolumeID(background.GetID())
        composite.SetForegroundVolumeID(foreground.GetID())
        composite.SetForegroundOpacity(opacity)
        composite.SetLabelVolumeID(label.GetID())
        composite.SetLabelOpacity(1.0)
        self.logic.FitSliceToAll()

    def rgba(self, offset: float) -> np.ndarray:
        """The blended slice at this offset (mm along the slice normal), rows top to bottom."""
        return view_rgba(self.logic, offset)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "slicer_overlay.png")
    parser.add_argument("--seed", type=int, default=6)
    parser.add_argument("--synthetic", action="store_true", help="smoothed truth instead of the network")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from strokeseg.io import read_image
    from strokeseg.phantom import simulate_dwi, write_case
    from StrokeSegLib.headless import create_context
    from StrokeSegLib.logic import StrokeSegLogic
    from StrokeSegLib.sampledata import NODE_NAMES
    from StrokeSegLib.segmentation import read_mask
    from StrokeSegLib.volumes import add_volume_from_image, image_from_volume, ijk_to_ras

    library = SOOP_LESIONS if SOOP_LESIONS.is_dir() else None
    with tempfile.TemporaryDirectory() as tmp:
        case = simulate_dwi(args.seed, lesion_library=library, split="test" if library else None,
                            lesion_pattern="territorial")
        case_dir = write_case(case, tmp)
        ctx = create_context(Path(tmp) / "cache")
        nodes = {k: ctx.load_volume(case_dir / f"{k}.nii.gz", name=NODE_NAMES[k]) for k in ("dwi", "adc", "b0")}
        logic = StrokeSegLogic(ctx.scene)
        logic.detect_inputs()
        if args.synthetic:
            from slicer_support import synthetic_result

            result = synthetic_result(image_from_volume(nodes["dwi"]), read_image(case_dir / "lesion.nii.gz").array)
            logic.apply_result(result)
            source = "probability: smoothed phantom truth (no network)"
        else:
            result = logic.segment(device="cpu")
            source = f"model {result.card.id} {result.card.version}"
        params = logic.params
        mask = read_mask(params.segmentation, params.lesionSegmentId, nodes["dwi"])
        label = add_volume_from_image(ctx.scene, image_from_volume(nodes["dwi"]).with_array(mask.astype(np.uint8)),
                                      "lesion label", reference=nodes["dwi"], class_name="vtkMRMLLabelMapVolumeNode")
        label.GetDisplayNode().SetAndObserveColorNodeID("vtkMRMLColorTableNodeLabels")

        # Three axial slices through the lesion, largest area first, shown in anatomical order.
        area = mask.reshape(mask.shape[0], -1).sum(1).astype(np.int64)
        ks = sorted(int(k) for k in np.argsort(-area)[:3]) if area.any() else [mask.shape[0] // 2]
        matrix = ijk_to_ras(nodes["dwi"])
        centre = np.array([(n - 1) / 2 for n in nodes["dwi"].GetImageData().GetDimensions()])
        renderer = SliceRenderer(ctx, nodes["dwi"], params.probabilityVolume, label, params.probabilityOpacity)
        panels = [renderer.rgba(float((matrix @ np.array([centre[0], centre[1], k, 1.0]))[2])) for k in ks]
        report = logic.update_statistics()
        truth_ml = float(case.lesion.array.sum()) * case.lesion.voxel_volume_ml

    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.9), squeeze=False)
    for ax, rgba, k in zip(axes[0], panels, ks):
        ax.imshow(rgba[..., :3])
        ax.set_title(f"axial slice {k}", fontsize=9)
        ax.axis("off")
    fig.suptitle(
        f"Slicer slice views (headless): DWI b1000 + lesion probability (red to yellow, opacity {params.probabilityOpacity:.1f})"
        f" + lesion outline\n{source}: {report['total_volume_ml']:.1f} mL in {report['lesion_count']} lesion(s);"
        f" phantom truth {truth_ml:.1f} mL", fontsize=9)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main()
