"""Small helpers shared by the TSD tests (tiny models on random tensors)."""
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from tsd import add_tsd_config


def tiny_cfg(roi_heads="TSDROIHeads", mask_on=False, num_classes=3):
    """A tiny ResNet-18 FPN (32 channels) R-CNN config on CPU with the given ROI heads."""
    cfg = get_cfg()
    add_tsd_config(cfg)
    cfg.merge_from_list([
        "MODEL.META_ARCHITECTURE", "GeneralizedRCNN",
        "MODEL.DEVICE", "cpu",
        "MODEL.BACKBONE.NAME", "build_resnet_fpn_backbone",
        "MODEL.RESNETS.DEPTH", 18,
        "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
        "MODEL.RESNETS.OUT_FEATURES", ["res2", "res3", "res4", "res5"],
        "MODEL.RESNETS.NORM", "BN",
        "MODEL.BACKBONE.FREEZE_AT", 0,
        "MODEL.FPN.IN_FEATURES", ["res2", "res3", "res4", "res5"],
        "MODEL.FPN.OUT_CHANNELS", 32,
        "MODEL.ANCHOR_GENERATOR.SIZES", [[32], [64], [128], [256], [512]],
        "MODEL.RPN.IN_FEATURES", ["p2", "p3", "p4", "p5", "p6"],
        "MODEL.RPN.POST_NMS_TOPK_TRAIN", 64,
        "MODEL.RPN.POST_NMS_TOPK_TEST", 32,
        "MODEL.ROI_HEADS.NAME", roi_heads,
        "MODEL.ROI_HEADS.IN_FEATURES", ["p2", "p3", "p4", "p5"],
        "MODEL.ROI_HEADS.NUM_CLASSES", num_classes,
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 32,
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0,
        "MODEL.ROI_BOX_HEAD.NAME", "FastRCNNConvFCHead",
        "MODEL.ROI_BOX_HEAD.NUM_FC", 2,
        "MODEL.ROI_BOX_HEAD.FC_DIM", 64,
        "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", 7,
        "MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA", 1.0,
        "MODEL.ROI_MASK_HEAD.NAME", "MaskRCNNConvUpsampleHead",
        "MODEL.ROI_MASK_HEAD.NUM_CONV", 1,
        "MODEL.ROI_MASK_HEAD.CONV_DIM", 32,
        "MODEL.MASK_ON", mask_on,
        "MODEL.TSD.FC_DIM", 64,
        "MODEL.TSD.OFFSET_FC_DIM", 32,
    ])
    if roi_heads == "TSDCascadeROIHeads":
        cfg.MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG = False
    return cfg


def random_batch(num_images=2, size=(96, 128), num_boxes=(2, 0), seed=0, masks=False):
    """Random images with random GT boxes (``num_boxes[i]`` per image, 0 = no objects)."""
    g = torch.Generator().manual_seed(seed)
    batch = []
    for i in range(num_images):
        h, w = size
        img = torch.randint(0, 255, (3, h, w), generator=g, dtype=torch.uint8).float()
        inst = Instances((h, w))
        n = num_boxes[i % len(num_boxes)]
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w / 2, h / 2])
        wh = 16 + torch.rand(n, 2, generator=g) * torch.tensor([w / 2 - 16, h / 2 - 16])
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
        inst.gt_classes = torch.randint(0, 3, (n,), generator=g)
        if masks:
            from detectron2.structures import PolygonMasks
            polys = [[[b[0], b[1], b[2], b[1], b[2], b[3], b[0], b[3]]] for b in
                     inst.gt_boxes.tensor.tolist()]
            inst.gt_masks = PolygonMasks(polys)
        batch.append({"image": img, "instances": inst, "height": h, "width": w})
    return batch


def build(cfg, seed=0):
    torch.manual_seed(seed)
    return build_model(cfg)


_R50_HEADS = {}


def r50_heads():
    """The full-size R-50 FPN TSDROIHeads for COCO (80 classes), built once per session."""
    if "heads" not in _R50_HEADS:
        from detectron2.layers import ShapeSpec
        from detectron2.modeling.roi_heads import build_roi_heads

        cfg = get_cfg()
        add_tsd_config(cfg)
        cfg.MODEL.ROI_HEADS.NAME = "TSDROIHeads"
        cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5"]
        cfg.MODEL.ROI_HEADS.NUM_CLASSES = 80
        cfg.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
        cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 2
        cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 7
        shapes = {f"p{lvl}": ShapeSpec(channels=256, stride=2 ** lvl) for lvl in (2, 3, 4, 5)}
        torch.manual_seed(0)
        _R50_HEADS["heads"] = build_roi_heads(cfg, shapes)
    return _R50_HEADS["heads"]


def proposals(boxes, image_size):
    """One image's ``Instances`` with ``proposal_boxes`` (zero objectness) at ``image_size``."""
    inst = Instances(image_size)
    inst.proposal_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.objectness_logits = torch.zeros(len(boxes))
    return [inst]


def targets(boxes, classes, image_size):
    """One image's ground truth ``Instances`` (``gt_boxes``, ``gt_classes``) at ``image_size``."""
    inst = Instances(image_size)
    inst.gt_boxes = Boxes(torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.tensor(classes, dtype=torch.int64)
    return [inst]
