"""Config keys of the `dynamic_rcnn` package (all under `MODEL.DYNAMIC_RCNN`).

Dynamic R-CNN (Zhang et al., ECCV 2020) adapts two training hyper-parameters of the R-CNN head:
the fg/bg IoU threshold ``T_now`` (dynamic label assignment, paper §3.1) and the SmoothL1 ``beta``
of the box-regression loss (dynamic SmoothL1, paper §3.2). The defaults below are the values of
every reference code base (K_I = 75, K_beta = 10, C = 100, floor 0.4, cap 1.0).
"""
from detectron2.config import CfgNode as CN

__all__ = ["add_dynamic_rcnn_config"]


def add_dynamic_rcnn_config(cfg):
    """Add this method's keys to `cfg` in place (call before `merge_from_file`)."""
    _C = cfg.MODEL.DYNAMIC_RCNN = CN()
    # K_I: per-iteration IoU statistic = the K_I-th largest proposal-to-GT IoU (per image in
    # "mmdet" mode, K_I * #images over the pooled batch in "original" mode).
    _C.KI = 75
    # K_beta: per-iteration beta statistic = the (K_beta * #images)-th smallest regression-label
    # magnitude (|dx| + |dy|) / 2.
    _C.KBETA = 10
    # C: T_now and beta_now are recomputed every UPDATE_ITERS training iterations from the
    # statistics of the last UPDATE_ITERS iterations (the window), then the window is cleared.
    _C.UPDATE_ITERS = 100
    # T_now before the first update. 0.4 = the authors' code; 0.5 mimics MMDetection's config.
    _C.INITIAL_IOU = 0.4
    # Floor of T_now: T_now = max(mean(S_I), IOU_FLOOR). There is no cap.
    _C.IOU_FLOOR = 0.4
    # beta_now before the first update (every reference starts at 1.0).
    _C.INITIAL_BETA = 1.0
    # Cap of beta_now: beta_now = min(median(S_E), BETA_CAP).
    _C.BETA_CAP = 1.0
    # Keep the previous beta when the window median is below this value (MMDetection PR #4303);
    # beta = 0 would make the loss plain L1.
    _C.BETA_EPS = 1e-15
    # Definition of the statistics: "mmdet" (MMDetection 2.x/3.x and the authors' MMDet port:
    # per-image IoU statistic averaged over images, beta statistic over the sampled positives) or
    # "original" (authors' maskrcnn-benchmark code: pooled IoU statistic with the GT#0 quirk,
    # beta statistic over all proposals before sampling).
    _C.STATISTICS = "mmdet"
    # Median of the beta window: "numpy" (mean of the two middle values, MMDetection 2.x/3.x) or
    # "upper" (sorted(S_E)[len // 2], authors' code and MMDet v1.1 port).
    _C.MEDIAN = "numpy"
    # False: every process keeps its own statistics (as every reference). True: the statistics
    # are gathered over all processes so every rank uses the same T_now and beta_now.
    _C.SYNC_STATS = False
    # Test-time augmentation (TEST.AUG.ENABLED): besides Detectron2's TEST.AUG.MIN_SIZES passes
    # at TEST.AUG.MAX_SIZE, also run the standard INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST pass (and
    # its flip with TEST.AUG.FLIP), as the authors' multi-scale test does (800/1333 + 800..1600
    # at max 2000).
    _C.TTA_ADD_TEST_SIZE = False
    # How the TTA passes are merged: "raw" (the authors' bbox_aug: the union of every pass's raw
    # detections, before score threshold / NMS / top-k, is filtered once) or "detections"
    # (Detectron2's GeneralizedRCNNWithTTA: per-pass post-processed detections are merged).
    _C.TTA_MERGE = "raw"
