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


def test_configs_ship_in_a_non_editable_install(tmp_path):
    # `pip install .` (not -e) must carry every YAML inside the `projects` package
    import subprocess
    import sys
    import zipfile

    from projects.testing import repo_root

    subprocess.run([sys.executable, "-m", "pip", "wheel", repo_root(), "--no-deps",
                    "--no-build-isolation", "-q", "-w", str(tmp_path)], check=True)
    (wheel,) = tmp_path.glob("*.whl")
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".yaml")}
    expected = {"projects/configs/" + n for n in projects.model_zoo.list_configs()}
    assert expected <= shipped
    packages = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".py")}
    assert {"projects", "projects_common", "res2net", "dynamic_rcnn", "tsd", "decoupled_rcnn",
            "rdsnet"} <= packages
