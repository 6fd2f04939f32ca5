"""Multi-scale + flip testing of the authors' code (spec §5.1, `engine/bbox_aug.py`).

Detections of the standard test pass (INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST) and its flip, plus
TEST.AUG.MIN_SIZES at TEST.AUG.MAX_SIZE (each also flipped) are pooled, then per-class NMS
(ROI_HEADS.NMS_THRESH_TEST), score threshold and top-k, which is Detectron2's
`GeneralizedRCNNWithTTA` merge. Detectron2's TTA has no standard-size pass when TEST.AUG.MAX_SIZE
differs from INPUT.MAX_SIZE_TEST, so with MODEL.DYNAMIC_RCNN.TTA_ADD_TEST_SIZE the two mappers'
augmented inputs are concatenated. Registered with `projects_common.tta` for "DynamicROIHeads".
"""
from typing import Callable, List, Sequence

from detectron2.modeling import GeneralizedRCNNWithTTA
from detectron2.modeling.test_time_augmentation import DatasetMapperTTA

from projects_common.tta import register_tta_builder

__all__ = ["ConcatTTAMapper", "build_dynamic_rcnn_tta"]


class ConcatTTAMapper:
    """Calls several TTA mappers on one dataset dict and concatenates their augmented inputs
    (each a dict with "image" (C, H, W) and the "transforms" to invert)."""

    def __init__(self, mappers: Sequence[Callable]):
        self.mappers = list(mappers)

    def __call__(self, dataset_dict) -> List[dict]:
        return [aug for mapper in self.mappers for aug in mapper(dataset_dict)]


def build_dynamic_rcnn_tta(cfg, model):
    """`GeneralizedRCNNWithTTA` over TEST.AUG, plus the standard-size pass when
    MODEL.DYNAMIC_RCNN.TTA_ADD_TEST_SIZE."""
    if not cfg.MODEL.DYNAMIC_RCNN.TTA_ADD_TEST_SIZE:
        return GeneralizedRCNNWithTTA(cfg, model)
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
    return GeneralizedRCNNWithTTA(cfg, model, tta_mapper=mapper)


register_tta_builder("DynamicROIHeads", build_dynamic_rcnn_tta)
