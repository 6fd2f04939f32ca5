"""Config keys of the `rdsnet` package (all under `MODEL.RDSNET`).

Defaults follow the authors' mmdetection-v1 configs (`configs/rdsnet/rdsnet_r50_fpn_1x.py`).
The Detectron2 keys RDSNet also reads are `MODEL.ANCHOR_GENERATOR.*` (anchors),
`MODEL.FPN.*` / `MODEL.RESNETS.*` (backbone), `MODEL.PIXEL_MEAN/STD`, `MODEL.MASK_ON`.
"""
from detectron2.config import CfgNode as CN


def add_rdsnet_config(cfg):
    """Add this method's keys to `cfg` in place (call before `merge_from_file`)."""
    _C = cfg
    _C.MODEL.RDSNET = CN()
    # Number of foreground classes (80 for COCO); sigmoid classification, no background logit.
    _C.MODEL.RDSNET.NUM_CLASSES = 80
    # FPN levels the object stream runs on (shared head, no per-level scale).
    _C.MODEL.RDSNET.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    # Dimension d of the object / pixel representations; each anchor predicts 2 x d (bg, fg).
    _C.MODEL.RDSNET.REP_DIM = 32
    # conv3x3-norm-ReLU blocks in each of the cls / box / rep towers.
    _C.MODEL.RDSNET.NUM_CONVS = 4
    # Normalisation in the towers and the pixel stream ("GN" = GroupNorm(32); "" = conv bias only).
    _C.MODEL.RDSNET.NORM = "GN"
    # Prior probability used to initialise the classification bias (-log((1-p)/p) = -4.595).
    _C.MODEL.RDSNET.PRIOR_PROB = 0.01
    # FPN levels fused by the pixel stream (stride 8, 16, 32; fused at stride 8, output stride 4).
    _C.MODEL.RDSNET.PIXEL_IN_FEATURES = ["p3", "p4", "p5"]
    # Channels of the pixel-stream convs.
    _C.MODEL.RDSNET.PIXEL_CONV_DIM = 256
    # Images are padded to a multiple of this (mmdet `size_divisor=32`; D2's FPN would say 128).
    _C.MODEL.RDSNET.SIZE_DIVISIBILITY = 32
    # Source of P6 ("res5" = C5, as mmdet's `extra_convs_on_inputs=True`, or "p5").
    _C.MODEL.RDSNET.P67_IN_FEATURE = "res5"
    # ReLU between P6 and P7 (mmdet v1: none; Detectron2's LastLevelP6P7: yes).
    _C.MODEL.RDSNET.P67_RELU_BEFORE_P7 = False
    # mmdet-v1 "+1" box conventions: widths x2-x1+1 in the box coder, IoU, NMS and crop padding;
    # boxes are inclusive pixel indices internally and exported as [x1, y1, x2+1, y2+1].
    _C.MODEL.RDSNET.BOX_PLUS_ONE = True
    # Box-coder weights for (dx, dy, dw, dh) (mmdet target_stds = 1).
    _C.MODEL.RDSNET.BBOX_REG_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
    # Anchor IoU thresholds and labels (negative < 0.4 <= ignored < 0.5 <= positive).
    _C.MODEL.RDSNET.IOU_THRESHOLDS = [0.4, 0.5]
    _C.MODEL.RDSNET.IOU_LABELS = [0, -1, 1]
    # Focal loss (sigmoid) parameters.
    _C.MODEL.RDSNET.FOCAL_LOSS_ALPHA = 0.25
    _C.MODEL.RDSNET.FOCAL_LOSS_GAMMA = 2.0
    # Smooth-L1 beta of the box loss (mmdet: 0.11).
    _C.MODEL.RDSNET.SMOOTH_L1_BETA = 0.11
    # At most this many positive anchors per image are sampled for the mask loss.
    _C.MODEL.RDSNET.MASKS_TO_TRAIN = 100
    # Positive anchors whose GT mask has <= this many pixels (resized, full resolution) are dropped.
    _C.MODEL.RDSNET.MASK_MIN_AREA = 100
    # Crop expansion per side (fraction of the box size; >= 1 px) in training / at test.
    _C.MODEL.RDSNET.TRAIN_CROP_PAD = 0.25
    _C.MODEL.RDSNET.TEST_CROP_PAD = 0.1
    # Hard-negative mining of the mask loss: kept negatives = ratio x positives (<= 0: off).
    _C.MODEL.RDSNET.OHEM_POS_NEG_RATIO = 1.0
    # Weight of the mask loss.
    _C.MODEL.RDSNET.MASK_LOSS_WEIGHT = 1.0
    # Inference: per-class score threshold, per-level top-k anchors, NMS IoU, detections per image.
    _C.MODEL.RDSNET.SCORE_THRESH_TEST = 0.05
    _C.MODEL.RDSNET.TOPK_CANDIDATES_TEST = 1000
    _C.MODEL.RDSNET.NMS_THRESH_TEST = 0.5
    _C.MODEL.RDSNET.DETECTIONS_PER_IMAGE = 100
    # Foreground probability threshold of the final masks (strictly greater than).
    _C.MODEL.RDSNET.MASK_THRESH = 0.4
    # Instances processed together when pasting masks at image resolution (memory bound only).
    _C.MODEL.RDSNET.MASK_PASTE_CHUNK = 16

    # Mask-based Boundary Refinement Module (test-time only, fixed constants).
    _C.MODEL.RDSNET.MBRM = CN()
    # Refine boxes from the masks at test time (the *_refine configs).
    _C.MODEL.RDSNET.MBRM.ENABLED = False
    # sigma of the Gaussian edge prior = GAMMA x box size (>= 1 px).
    _C.MODEL.RDSNET.MBRM.GAMMA = 0.05
    # Length of the fixed 1-D boundary kernel (only 9 is provided by the authors).
    _C.MODEL.RDSNET.MBRM.KERNEL_SIZE = 9
