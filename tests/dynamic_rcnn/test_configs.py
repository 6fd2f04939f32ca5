"""The configs encode the seed rows: schedules, scales, DCN, TTA, RPN NMS 0.85.
(Building and one training iteration of every YAML is the foundation config sweep.)"""
import pytest

import projects
from projects.testing import load_config

ROWS = {
    # name: (depth, max_iter, steps, min_size_train, max_size_train, dcn)
    "dynamic_rcnn_R_50_FPN_1x": (50, 90000, (60000, 80000), (800,), 1333, False),
    "dynamic_rcnn_R_50_FPN_2x": (50, 180000, (120000, 160000), (800,), 1333, False),
    "dynamic_rcnn_R_101_FPN_1x": (101, 90000, (60000, 80000), (800,), 1333, False),
    "dynamic_rcnn_R_101_FPN_2x": (101, 180000, (120000, 160000), (800,), 1333, False),
    "dynamic_rcnn_R_101_FPN_MS_3x": (101, 270000, (180000, 240000), (400, 600, 800, 1000, 1200),
                                     1400, False),
    "dynamic_rcnn_R_101_DCNv2_FPN_MS_3x": (101, 270000, (180000, 240000),
                                           (400, 600, 800, 1000, 1200), 1400, True),
}


def _load(name):
    return load_config(projects.model_zoo.get_config_file(f"dynamic_rcnn/{name}.yaml"))


@pytest.mark.parametrize("name", sorted(ROWS))
def test_seed_rows(name):
    depth, max_iter, steps, min_train, max_train, dcn = ROWS[name]
    cfg = _load(name)
    assert cfg.MODEL.ROI_HEADS.NAME == "DynamicROIHeads"
    assert cfg.MODEL.RPN.NMS_THRESH == 0.85
    assert cfg.MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE == "smooth_l1"
    d = cfg.MODEL.DYNAMIC_RCNN
    assert (d.KI, d.KBETA, d.UPDATE_ITERS, d.INITIAL_IOU, d.IOU_FLOOR, d.INITIAL_BETA,
            d.BETA_CAP) == (75, 10, 100, 0.4, 0.4, 1.0, 1.0)
    assert cfg.MODEL.RESNETS.DEPTH == depth
    assert (cfg.SOLVER.MAX_ITER, tuple(cfg.SOLVER.STEPS)) == (max_iter, steps)
    assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == min_train and cfg.INPUT.MAX_SIZE_TRAIN == max_train
    assert cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING == "choice"
    assert (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST) == (800, 1333)
    assert cfg.SOLVER.IMS_PER_BATCH == 16 and cfg.SOLVER.BASE_LR == 0.02
    expected_dcn = [False, True, True, True] if dcn else [False] * 4
    assert list(cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE) == expected_dcn
    if dcn:
        assert cfg.MODEL.RESNETS.DEFORM_MODULATED and cfg.MODEL.RESNETS.DEFORM_NUM_GROUPS == 1
    assert not cfg.TEST.AUG.ENABLED


def test_tta_row():
    cfg = _load("dynamic_rcnn_R_101_DCNv2_FPN_MS_3x_MS_test")
    assert cfg.TEST.AUG.ENABLED and cfg.TEST.AUG.FLIP
    assert tuple(cfg.TEST.AUG.MIN_SIZES) == (800, 1000, 1200, 1400, 1600)
    assert cfg.TEST.AUG.MAX_SIZE == 2000 and cfg.MODEL.DYNAMIC_RCNN.TTA_ADD_TEST_SIZE


def test_res2net_variant():
    cfg = _load("dynamic_rcnn_Res2Net_50_FPN_1x")
    assert cfg.MODEL.BACKBONE.NAME == "build_res2net_fpn_backbone"
    assert cfg.MODEL.RES2NET.DEPTH == 50 and cfg.MODEL.ROI_HEADS.NAME == "DynamicROIHeads"
    assert cfg.INPUT.FORMAT == "RGB"
