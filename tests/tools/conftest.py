"""Fixtures for the tests of the scripts in `tools/`: loading a tool as a module and a tiny
ResNet-18-FPN Mask R-CNN config on the built-in `shapes` datasets."""
import importlib.util
import os
import sys

import pytest

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

TINY_CONFIG = """\
_BASE_: "{base}"
MODEL:
  WEIGHTS: ""
  DEVICE: "{device}"
  MASK_ON: True
  BACKBONE:
    FREEZE_AT: 0
  RESNETS:
    DEPTH: 18
    RES2_OUT_CHANNELS: 64
    NORM: "BN"
  FPN:
    OUT_CHANNELS: 32
  ANCHOR_GENERATOR:
    SIZES: [[8], [16], [32], [64], [128]]
  RPN:
    PRE_NMS_TOPK_TRAIN: 100
    POST_NMS_TOPK_TRAIN: 50
    PRE_NMS_TOPK_TEST: 100
    POST_NMS_TOPK_TEST: 20
    BATCH_SIZE_PER_IMAGE: 64
  ROI_HEADS:
    NUM_CLASSES: 3
    BATCH_SIZE_PER_IMAGE: 32
  ROI_BOX_HEAD:
    FC_DIM: 64
  ROI_MASK_HEAD:
    CONV_DIM: 16
    NUM_CONV: 1
DATASETS:
  TRAIN: ("shapes_train",)
  TEST: ("shapes_val",)
INPUT:
  MIN_SIZE_TRAIN: (64,)
  MAX_SIZE_TRAIN: 128
  MIN_SIZE_TEST: 64
  MAX_SIZE_TEST: 128
DATALOADER:
  NUM_WORKERS: 0
SOLVER:
  IMS_PER_BATCH: 2
TEST:
  DETECTIONS_PER_IMAGE: 10
"""


def _load_tool(name):
    """Import `tools/<name>.py` as a module (tools/ is not a package)."""
    module_name = f"_tools_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(
        module_name, os.path.join(REPO_ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def load_tool():
    """`load_tool(name)` imports `tools/<name>.py` as a module."""
    return _load_tool


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory):
    """Path of a YAML for a tiny ResNet-18 FPN Mask R-CNN (3 classes, 64-128 px, on
    $TEST_DEVICE, default cpu)."""
    path = tmp_path_factory.mktemp("configs") / "tiny_mask_rcnn_R_18_FPN.yaml"
    path.write_text(TINY_CONFIG.format(
        base=os.path.join(REPO_ROOT, "configs", "Base-RCNN-FPN.yaml"),
        device=os.environ.get("TEST_DEVICE", "cpu")))
    return str(path)
