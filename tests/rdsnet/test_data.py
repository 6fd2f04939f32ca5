"""RDSNet's training GT boxes follow the authors' pipeline: inclusive [x, y, x+w-1, y+h-1]
scaled by the resize factor s, also after a horizontal flip (x' = W - 1 - x)."""
import numpy as np
import pytest
import rdsnet_tiny
from detectron2.data import transforms as T
from detectron2.structures import BoxMode
from PIL import Image

from projects.data import build_train_mapper
from rdsnet.data import RDSNetDatasetMapper


def _record(tmp_path):
    path = tmp_path / "img.png"
    Image.fromarray(np.zeros((40, 60, 3), dtype=np.uint8)).save(path)
    return {
        "file_name": str(path), "height": 40, "width": 60, "image_id": 0,
        "annotations": [{"bbox": [10, 4, 20, 8], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0,
                         "iscrowd": 0}],
    }


@pytest.mark.parametrize("flip", [False, True])
def test_gt_boxes_scaled_as_the_authors(tmp_path, flip):
    """COCO [10, 4, 20, 8] resized x2.5 to 100x150: inclusive [25, 10, 72.5, 27.5] = (x+w-1) s
    (Detectron2 alone: (x+w) s - 1 = 74); flipped: [150-1-72.5, 10, 150-1-25, 27.5]. Returned in
    Detectron2's continuous convention, i.e. inclusive + 1 on x2, y2 (the model subtracts it)."""
    augs = [T.Resize((100, 150))] + ([T.RandomFlip(prob=1.0)] if flip else [])
    mapper = RDSNetDatasetMapper(is_train=True, augmentations=augs, image_format="RGB")
    box = mapper(_record(tmp_path))["instances"].gt_boxes.tensor[0].tolist()
    inclusive = [25.0, 10.0, 72.5, 27.5] if not flip else [76.5, 10.0, 124.0, 27.5]
    assert box == pytest.approx([inclusive[0], inclusive[1], inclusive[2] + 1, inclusive[3] + 1])


def test_trainer_mapper_converts_rdsnet_boxes(tmp_path):
    """The project's training mapper applies it to RDSNet with BOX_PLUS_ONE, not otherwise."""
    opts = ["INPUT.MIN_SIZE_TRAIN", (100,), "INPUT.RANDOM_FLIP", "none"]
    box = build_train_mapper(rdsnet_tiny.tiny_cfg(opts=opts))(_record(tmp_path))
    assert box["instances"].gt_boxes.tensor[0].tolist() == pytest.approx([25, 10, 73.5, 28.5])
    cfg = rdsnet_tiny.tiny_cfg(opts=opts + ["MODEL.RDSNET.BOX_PLUS_ONE", False])
    box = build_train_mapper(cfg)(_record(tmp_path))
    assert box["instances"].gt_boxes.tensor[0].tolist() == pytest.approx([25, 10, 75, 30])


def test_gt_masks_at_pad_shape_inputs_and_errors():
    """GT masks as BitMasks, polygons or a raw tensor are zero-padded to the pad shape (bool);
    no GT gives (0, pad_h, pad_w); instances without masks are a clear error."""
    import torch
    from detectron2.structures import Boxes, Instances, PolygonMasks

    from rdsnet.targets import gt_bitmasks_at_pad_shape

    inst = Instances((5, 6))
    inst.gt_masks = torch.ones(1, 5, 6, dtype=torch.uint8)
    out = gt_bitmasks_at_pad_shape(inst, (8, 12), "cpu")
    assert out.dtype == torch.bool and out.shape == (1, 8, 12)
    assert int(out.sum()) == 30 and bool(out[0, :5, :6].all())
    inst.gt_masks = PolygonMasks([[[0, 0, 4, 0, 4, 4, 0, 4]]])
    assert int(gt_bitmasks_at_pad_shape(inst, (8, 12), "cpu").sum()) == 16
    empty = Instances((5, 6))
    empty.gt_masks = torch.zeros(0, 5, 6, dtype=torch.bool)
    out = gt_bitmasks_at_pad_shape(empty, (8, 12), "cpu")
    assert out.shape == (0, 8, 12) and out.dtype == torch.bool
    no_masks = Instances((5, 6))
    no_masks.gt_boxes = Boxes(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"RDSNet with MODEL.MASK_ON=True needs 'gt_masks' in "
                                         r"the training instances \(a dataset "
                                         r"with segmentation annotations\)"):
        gt_bitmasks_at_pad_shape(no_masks, (8, 12), "cpu")
