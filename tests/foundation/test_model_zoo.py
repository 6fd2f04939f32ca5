"""Configs are found through importlib.resources, inside the installed package."""
import importlib.resources
import os

import projects


def test_get_config_file_and_get_config():
    path = projects.model_zoo.get_config_file("quickstart/mask_rcnn_R_18_FPN_shapes.yaml")
    assert os.path.isfile(path)
    assert str(importlib.resources.files("projects")) in path
    cfg = projects.model_zoo.get_config("quickstart/mask_rcnn_R_18_FPN_shapes.yaml")
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 3 and cfg.MODEL.MASK_ON
    for key in ("RES2NET", "DYNAMIC_RCNN", "TSD", "DECOUPLED_RCNN", "RDSNET"):
        assert key in cfg.MODEL, key


def test_every_method_adds_its_own_subtree_only():
    from detectron2.config import get_cfg as d2_get_cfg

    d2 = d2_get_cfg()
    ours = projects.get_cfg()
    assert set(ours.MODEL.keys()) - set(d2.MODEL.keys()) == {
        "RES2NET", "DYNAMIC_RCNN", "TSD", "DECOUPLED_RCNN", "RDSNET"}
    # the global Detectron2 defaults are not mutated
    assert "RES2NET" not in d2_get_cfg().MODEL


def test_trained_weights_are_not_claimed():
    import pytest

    with pytest.raises(ValueError, match="no trained checkpoint"):
        projects.model_zoo.get_config("quickstart/mask_rcnn_R_18_FPN_shapes.yaml", trained=True)
