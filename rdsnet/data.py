"""Training data of RDSNet: GT boxes as the authors' mmdetection-v1 pipeline.

mmdet parses a COCO box [x, y, w, h] as the inclusive pixel box [x, y, x + w - 1, y + h - 1]
and then scales its coordinates by the resize factor s, so the resized right edge is
(x + w - 1) s. Detectron2 scales the continuous box [x, x + w] instead, which in inclusive
pixels is (x + w) s - 1: up to (s - 1) px wider. `RDSNetDatasetMapper` shrinks each box by
(1 - 1/s) at its far edges before the transforms, so that after them the continuous box is
[x s, (x + w - 1) s + 1]: the model's inclusive conversion (x2 - 1) then gives the authors'
(x + w - 1) s, also after a horizontal flip (mmdet flips inclusive boxes as W - 1 - x).
"""
import numpy as np
from detectron2.data import DatasetMapper
from detectron2.structures import BoxMode

__all__ = ["RDSNetDatasetMapper", "authors_box_scale"]


def authors_box_scale(transforms) -> np.ndarray:
    """(sx, sy): how much the transforms stretch a unit length along x and y (resize factors)."""
    corners = transforms.apply_coords(np.array([[0.0, 0.0], [1.0, 1.0]]))
    return np.abs(corners[1] - corners[0])


class RDSNetDatasetMapper(DatasetMapper):
    """Detectron2's `DatasetMapper` whose GT boxes follow the authors' "+1" pipeline (see module
    docstring); use it for training with ``MODEL.RDSNET.BOX_PLUS_ONE: True``."""

    def _transform_annotations(self, dataset_dict, transforms, image_shape):
        sx, sy = authors_box_scale(transforms)
        for anno in dataset_dict.get("annotations", []):
            box = BoxMode.convert(list(anno["bbox"]), anno["bbox_mode"], BoxMode.XYXY_ABS)
            box[2] -= 1.0 - 1.0 / sx
            box[3] -= 1.0 - 1.0 / sy
            anno["bbox"], anno["bbox_mode"] = box, BoxMode.XYXY_ABS
        super()._transform_annotations(dataset_dict, transforms, image_shape)
