"""The slider loop: probability map -> lesion mask -> segment, never overwriting user edits.

Moving the threshold, closing radius or minimum-size slider recomputes the mask from the stored
probability map with the engine's :class:`MaskRefiner` (it caches what the moved slider does
not change) and writes it into the managed lesion segment. Before writing, the segment is
checked against the fingerprint of the last mask StrokeSeg wrote into it
(``StrokeSeg.MaskDigest`` tag): if the user changed it (Segment Editor, or any other tool),
the edited segment is left as it is, tagged ``StrokeSeg.Edited``, renamed "... (edited)" and
recorded in the parameter node's ``protectedSegmentIds``; the new mask goes to a new segment,
which the sliders drive from then on. The check is cheap on the common path: the segment's
labelmap object and modification time are remembered after each write, and the voxels are
only compared when they changed.

Undo/redo: Slicer's MRML scene undo is not used for segmentations (the application disables
it; the Segment Editor keeps a ``vtkSegmentationHistory`` instead). This module keeps its own
``vtkSegmentationHistory`` of the segmentation: every write saves the previous state first,
:meth:`LesionMask.undo` restores it (voxels, segments and their tags) and puts the sliders back
to the settings the restored mask was computed with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import slicer

from strokeseg.postprocess import MaskRefiner, PostprocessSettings

from .parameters import StrokeSegParameters
from .segmentation import (
    SETTINGS_TAG,
    add_segment,
    get_tag,
    hand_over_to_user,
    is_user_edited,
    managed_segments,
    read_mask,
    segment_mtime,
    write_mask,
)
from .terminology import LESION, SegmentTerm
from .volumes import geometry_from_ijk_to_ras, ijk_to_ras

MAX_UNDO_STATES = 20


@dataclass
class MaskUpdate:
    segment_id: str  # the segment that now holds the new mask
    created: bool  # a new segment was added for it
    kept_edited: str | None  # id of a user-edited segment left untouched, if any
    voxels: int
    mask: np.ndarray


def settings_from_parameters(params: StrokeSegParameters) -> PostprocessSettings:
    return PostprocessSettings(
        threshold=float(params.threshold),
        closing_mm=float(params.closingMm),
        min_lesion_ml=float(params.minLesionMl),
        fill_holes=bool(params.fillHoles),
    )


class LesionMask:
    """Keeps one segment of ``segmentation_node`` in step with the probability map and settings."""

    def __init__(
        self,
        segmentation_node: Any,
        reference: Any,
        probability_node: Any,
        params: StrokeSegParameters,
        term: SegmentTerm = LESION,
    ) -> None:
        self.segmentation_node = segmentation_node
        self.reference = reference
        self.probability_node = probability_node
        self.params = params
        self.term = term
        probability = slicer.util.arrayFromVolume(probability_node)
        ref_dims = reference.GetImageData().GetDimensions()
        if probability.shape != tuple(ref_dims[::-1]):
            raise ValueError("the probability map is not on the reference volume's grid")
        spacing, _, _ = geometry_from_ijk_to_ras(ijk_to_ras(reference))
        # The refiner holds the array by reference; the probability node is ours and not edited.
        self.refiner = MaskRefiner(probability, spacing)
        self._probability_mtime = probability_node.GetImageData().GetMTime()
        self.history = slicer.vtkSegmentationHistory()
        self.history.SetMaximumNumberOfStates(MAX_UNDO_STATES)
        self.history.SetSegmentation(segmentation_node.GetSegmentation())
        self._written: dict[str, tuple[str, int] | None] = {}

    # -- state ---------------------------------------------------------------------------
    @property
    def segment_id(self) -> str:
        return self.params.lesionSegmentId

    def is_stale(self) -> bool:
        """True when the probability voxels changed since the refiner was built."""
        image = self.probability_node.GetImageData()
        return image is None or image.GetMTime() != self._probability_mtime

    def _segment(self, segment_id: str):
        return self.segmentation_node.GetSegmentation().GetSegment(segment_id) if segment_id else None

    def is_edited(self, segment_id: str) -> bool:
        """Whether the segment's voxels differ from the last mask StrokeSeg wrote into it."""
        if self._segment(segment_id) is None:
            return False
        if segment_id in self._written and self._written[segment_id] == segment_mtime(self.segmentation_node, segment_id):
            return False
        edited = is_user_edited(self.segmentation_node, segment_id, self.reference)
        if not edited:  # remember the clean state: the next check is free again
            self._written[segment_id] = segment_mtime(self.segmentation_node, segment_id)
        return edited

    # -- the slider loop -----------------------------------------------------------------
    def compute(self, settings: PostprocessSettings | None = None) -> np.ndarray:
        return self.refiner.mask(settings or settings_from_parameters(self.params))

    def update(self, settings: PostprocessSettings | None = None) -> MaskUpdate:
        """Recompute the mask and write it, protecting user edits (see the module docstring)."""
        settings = settings or settings_from_parameters(self.params)
        mask = self.compute(settings)
        segment_id, created, kept = self.segment_id, False, None
        with slicer.util.NodeModify(self.segmentation_node):
            self.history.SaveState()
            if self._segment(segment_id) is None:
                segment_id, created = add_segment(self.segmentation_node, self.term), True
            elif self.is_edited(segment_id):
                kept = self._protect(segment_id)
                segment_id, created = add_segment(self.segmentation_node, self.term), True
            write_mask(self.segmentation_node, segment_id, mask, self.reference)
            self._segment(segment_id).SetTag(SETTINGS_TAG, json.dumps(settings.__dict__))
            self._written[segment_id] = segment_mtime(self.segmentation_node, segment_id)
        self.params.lesionSegmentId = segment_id
        return MaskUpdate(segment_id, created, kept, int(np.count_nonzero(mask)), mask)

    def _protect(self, segment_id: str) -> str:
        hand_over_to_user(self.segmentation_node, segment_id)
        self.params.add_protected_segment(segment_id)
        return segment_id

    def current_mask(self) -> np.ndarray:
        """The managed segment's voxels as they are now (user edits included)."""
        if self._segment(self.segment_id) is None:
            return np.zeros(self.refiner.probability.shape, dtype=np.uint8)
        return read_mask(self.segmentation_node, self.segment_id, self.reference)

    # -- undo ----------------------------------------------------------------------------
    def can_undo(self) -> bool:
        return bool(self.history.IsRestorePreviousStateAvailable())

    def can_redo(self) -> bool:
        return bool(self.history.IsRestoreNextStateAvailable())

    def undo(self) -> bool:
        return self._restore(self.history.RestorePreviousState)

    def redo(self) -> bool:
        return self._restore(self.history.RestoreNextState)

    def _restore(self, restore) -> bool:
        if not restore():
            return False
        self._written.clear()  # restored labelmaps are new objects: compare voxels next time
        if self._segment(self.segment_id) is None:
            self.params.lesionSegmentId = self._find_managed_segment()
        self._restore_settings()
        return True

    def _restore_settings(self) -> None:
        """Put the sliders back to the settings the restored mask was computed with."""
        segment = self._segment(self.segment_id)
        text = get_tag(segment, SETTINGS_TAG) if segment is not None else ""
        if not text:
            return
        try:
            saved = json.loads(text)
        except json.JSONDecodeError:
            return
        params = self.params
        was = params.node.StartModify()
        try:
            params.threshold = saved["threshold"]
            params.closingMm = saved["closing_mm"]
            params.minLesionMl = saved["min_lesion_ml"]
            params.fillHoles = bool(saved.get("fill_holes", True))
        except (KeyError, ValueError):
            pass  # settings outside today's slider ranges: leave the sliders alone
        finally:
            params.node.EndModify(was)

    def _find_managed_segment(self) -> str:
        """After an undo removed the managed segment: the newest unprotected one of our role."""
        protected = set(self.params.protected_segments())
        ids = [s for s in managed_segments(self.segmentation_node, self.term.key) if s not in protected]
        return ids[-1] if ids else ""
