"""Config keys of the `decoupled_rcnn` package (all under `MODEL.DECOUPLED_RCNN`).

The rest of a Decoupled R-CNN model is configured with Detectron2's own keys:
``MODEL.META_ARCHITECTURE: "DecoupledRCNN"`` (GeneralizedRCNN + the authors' FPN init),
``MODEL.PROPOSAL_GENERATOR.NAME: "DualNMSRPN"``, ``MODEL.ROI_HEADS.NAME: "DecoupledROIHeads"``,
``MODEL.RPN.NMS_THRESH`` (classification proposal set), ``MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE`` /
``POSITIVE_FRACTION`` / ``IOU_THRESHOLDS`` / ``PROPOSAL_APPEND_GT`` (classification samples),
``MODEL.ROI_BOX_HEAD.NUM_FC`` / ``FC_DIM`` / ``POOLER_*`` (every tower),
``MODEL.ROI_HEADS.SCORE_THRESH_TEST`` / ``NMS_THRESH_TEST`` and ``TEST.DETECTIONS_PER_IMAGE``.
"""
from detectron2.config import CfgNode as CN


def add_decoupled_rcnn_config(cfg):
    """Add this method's keys to `cfg` in place (call before `merge_from_file`)."""
    cfg.MODEL.DECOUPLED_RCNN = CN()
    _C = cfg.MODEL.DECOUPLED_RCNN
    # RPN NMS IoU threshold of the *regression* proposal set, used in training only (the
    # classification set uses MODEL.RPN.NMS_THRESH = 0.7). The authors' config: nms_thr=(0.7, 0.85).
    _C.RPN_NMS_THRESH_REG = 0.85
    # Proposals kept per image in the regression set after NMS (training only).
    _C.RPN_POST_NMS_TOPK_REG_TRAIN = 1000
    # Size of the positive-first sample per image: stage-0 regression set and stages 1..n
    # (all positives up to this number, topped up with random negatives; no GT boxes added).
    _C.REG_BATCH_SIZE_PER_IMAGE = 512
    # IoU threshold (inclusive) for a positive regression sample, one per regression stage
    # (stage 0 regression set, stage 1, stage 2). Cascade R-CNN would use 0.5/0.6/0.7.
    _C.REG_IOU_THRESHOLDS = [0.5, 0.5, 0.5]
    # Target stds of each regression stage (mmdet DeltaXYWHBBoxCoder); the box-coder weights are
    # their exact reciprocals, e.g. 1/0.033 = 30.30..., not 30. The number of entries is the
    # number of regression stages (stage 0 = decoupled head, then class-agnostic refine stages).
    # These replace MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS, which DecoupledROIHeads does not read.
    _C.STAGE_TARGET_STDS = [
        [0.1, 0.1, 0.2, 0.2],
        [0.05, 0.05, 0.1, 0.1],
        [0.033, 0.033, 0.067, 0.067],
    ]
    # Loss weight of each stage (stage 0 weights both its classification and regression loss).
    _C.STAGE_LOSS_WEIGHTS = [1.0, 0.5, 0.25]
    # The L1 loss of refine stage k is divided by this factor times the stage's RoI count
    # (the authors' "lamda = 0.5"; stage 0 divides by its RoI count, classification rows included).
    _C.REFINE_LOSS_NORMALIZER = 2.0
    # Weight init of the 2-FC towers: "xavier_uniform" (mmdet xavier_init, bias 0; the authors'
    # stage-0 towers), "c2_xavier" (Detectron2's default), or "pytorch_default" (nn.Linear's own
    # init; the authors' refine towers, whose custom init never runs).
    _C.TOWER_INIT = "xavier_uniform"
    # FPN conv init of the `DecoupledRCNN` meta-architecture: "xavier_uniform" (mmdet
    # xavier_init, bias 0; the authors') or "c2_xavier" (Detectron2's FPN default). Models
    # built with Detectron2's GeneralizedRCNN ignore this key.
    _C.FPN_INIT = "xavier_uniform"
    _C.REFINE_TOWER_INIT = "pytorch_default"
    # Test-time duplicate removal: "nms" (hard, IoU MODEL.ROI_HEADS.NMS_THRESH_TEST) or
    # "soft_nms_linear" (score *= 1 - IoU when IoU >= NMS_THRESH_TEST; the multi-scale rows).
    _C.TEST_NMS_TYPE = "nms"
    # Soft-NMS: detections whose decayed score drops below this are discarded.
    _C.SOFT_NMS_MIN_SCORE = 0.001
    # mmcv 1.1.2 `batched_nms` quirk: with at least this many (box, class)
    # candidates, soft-NMS keeps the *original* scores and ranks by them. 0 disables the quirk.
    _C.SOFT_NMS_SPLIT_THRESH = 10000
