"""Multi-scale + flip testing of the authors' code (`engine/bbox_aug.py`).

Passes: the standard test size (INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST, with
MODEL.DYNAMIC_RCNN.TTA_ADD_TEST_SIZE) and TEST.AUG.MIN_SIZES at TEST.AUG.MAX_SIZE, each also
flipped with TEST.AUG.FLIP (Detectron2's TTA has no standard-size pass when TEST.AUG.MAX_SIZE
differs from INPUT.MAX_SIZE_TEST, so the two mappers' augmented inputs are concatenated).

Merge (MODEL.DYNAMIC_RCNN.TTA_MERGE):

* ``"raw"`` (default, the authors' `bbox_aug`): every pass contributes its *raw* detections —
  all proposals' class-specific boxes and class probabilities, before any score threshold, NMS
  or top-k — mapped back to the original image; the union is filtered once: score >
  ROI_HEADS.SCORE_THRESH_TEST, per-class NMS ROI_HEADS.NMS_THRESH_TEST, top
  TEST.DETECTIONS_PER_IMAGE.
* ``"detections"``: Detectron2's `GeneralizedRCNNWithTTA` (each pass post-processed, then the
  union of those detections filtered again). A box suppressed inside one pass by a box that
  another pass's better box suppresses in turn is lost here, but survives the raw merge.

Registered with `projects_common.tta` for "DynamicROIHeads".
"""
from typing import Callable, List, Sequence, Tuple

import torch
from detectron2.modeling import GeneralizedRCNNWithTTA
from detectron2.modeling.roi_heads.fast_rcnn import fast_rcnn_inference_single_image
from detectron2.modeling.test_time_augmentation import DatasetMapperTTA

from projects_common.tta import register_tta_builder

__all__ = ["ConcatTTAMapper", "RawUnionTTA", "build_dynamic_rcnn_tta", "TTA_MERGES"]

TTA_MERGES = ("raw", "detections")


class ConcatTTAMapper:
    """Calls several TTA mappers on one dataset dict and concatenates their augmented inputs
    (each a dict with "image" (C, H, W) and the "transforms" to invert)."""

    def __init__(self, mappers: Sequence[Callable]):
        self.mappers = list(mappers)

    def __call__(self, dataset_dict) -> List[dict]:
        return [aug for mapper in self.mappers for aug in mapper(dataset_dict)]


class RawUnionTTA(GeneralizedRCNNWithTTA):
    """`GeneralizedRCNNWithTTA` whose box merge filters the union of the passes' raw
    detections once (see the module docstring). Masks (MASK_ON) are then predicted as in
    Detectron2: on the merged boxes, averaged over the passes."""

    @torch.no_grad()
    def raw_detections(self, inputs: List[dict]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Raw box-head outputs of one batch of augmented inputs.

        Returns, per input, ``(boxes, scores)``: boxes (R, K * 4) (or (R, 4) class-agnostic)
        decoded from the R proposals, in that input's (resized, maybe flipped) image
        coordinates (unclipped: the merge clips them to the original image, which is the same
        for resize and flip transforms); scores (R, K + 1) class probabilities (background
        last).
        """
        model = self.model
        images = model.preprocess_image(inputs)
        features = model.backbone(images.tensor)
        proposals, _ = model.proposal_generator(images, features, None)
        heads = model.roi_heads
        feats = [features[f] for f in heads.box_in_features]
        box_features = heads.box_head(
            heads.box_pooler(feats, [p.proposal_boxes for p in proposals])
        )
        predictions = heads.box_predictor(box_features)
        boxes = heads.box_predictor.predict_boxes(predictions, proposals)
        scores = heads.box_predictor.predict_probs(predictions, proposals)
        return list(zip(boxes, scores))

    def _get_augmented_boxes(self, augmented_inputs, tfms):
        raw = []
        for start in range(0, len(augmented_inputs), self.batch_size):
            raw.extend(self.raw_detections(augmented_inputs[start:start + self.batch_size]))
        all_boxes, all_scores = [], []
        for (boxes, scores), tfm in zip(raw, tfms):
            flat = boxes.reshape(-1, 4)
            original = tfm.inverse().apply_box(flat.cpu().numpy())
            all_boxes.append(torch.as_tensor(original, dtype=boxes.dtype, device=boxes.device)
                             .view(boxes.shape))
            all_scores.append(scores)
        return torch.cat(all_boxes, 0), torch.cat(all_scores, 0), None

    def _merge_detections(self, all_boxes, all_scores, all_classes, shape_hw):
        merged, _ = fast_rcnn_inference_single_image(
            all_boxes,
            all_scores,
            shape_hw,
            self.cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST,
            self.cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST,
            self.cfg.TEST.DETECTIONS_PER_IMAGE,
        )
        return merged


def build_dynamic_rcnn_tta(cfg, model):
    """TTA over TEST.AUG (plus the standard-size pass when MODEL.DYNAMIC_RCNN.TTA_ADD_TEST_SIZE),
    merged as MODEL.DYNAMIC_RCNN.TTA_MERGE says."""
    merge = cfg.MODEL.DYNAMIC_RCNN.TTA_MERGE
    if merge not in TTA_MERGES:
        raise ValueError(f"MODEL.DYNAMIC_RCNN.TTA_MERGE must be one of {TTA_MERGES}, got {merge!r}")
    cls = RawUnionTTA if merge == "raw" else GeneralizedRCNNWithTTA
    if not cfg.MODEL.DYNAMIC_RCNN.TTA_ADD_TEST_SIZE:
        return cls(cfg, model)
    mapper = ConcatTTAMapper(
        [
            DatasetMapperTTA(
                min_sizes=[cfg.INPUT.MIN_SIZE_TEST],
                max_size=cfg.INPUT.MAX_SIZE_TEST,
                flip=cfg.TEST.AUG.FLIP,
            ),
            DatasetMapperTTA(cfg),
        ]
    )
    return cls(cfg, model, tta_mapper=mapper)


register_tta_builder("DynamicROIHeads", build_dynamic_rcnn_tta)
