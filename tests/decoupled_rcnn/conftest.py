"""Shared helpers of the Decoupled R-CNN tests (configs built without the umbrella package)."""
import os

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec

import decoupled_rcnn  # noqa: F401  (registration)
from decoupled_rcnn import add_decoupled_rcnn_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_DIR = os.path.join(REPO, "configs", "decoupled_rcnn")
BASE = os.path.join(CONFIG_DIR, "Base-DecoupledRCNN-FPN.yaml")
R50 = os.path.join(CONFIG_DIR, "decoupled_rcnn_R_50_FPN_2x.yaml")

# A tiny ResNet-18 FPN for fast CPU tests (the method's own settings come from the YAML).
TINY_OPTS = [
    "MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
    "MODEL.FPN.OUT_CHANNELS", 32, "MODEL.ROI_BOX_HEAD.FC_DIM", 64,
    "MODEL.ROI_HEADS.NUM_CLASSES", 3, "MODEL.BACKBONE.FREEZE_AT", 0,
    "MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu",
]


def _make_cfg(config_file=R50, opts=()):
    cfg = get_cfg()
    add_decoupled_rcnn_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def _fpn_shapes(channels=256):
    return {f"p{i}": ShapeSpec(channels=channels, stride=2 ** i) for i in range(2, 7)}


@pytest.fixture(scope="module")
def full_r50_model():
    """The R-50 Decoupled R-CNN (80 classes, 256-channel FPN, 1024-d towers), untrained
    (module scope: ~330 MB, freed after each test module)."""
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    model = build_model(_make_cfg(R50))
    model.eval()
    return model


@pytest.fixture(scope="session")
def make_cfg():
    """``make_cfg(config_file=R50, opts=())`` -> a Decoupled R-CNN config on CPU."""
    return _make_cfg


@pytest.fixture(scope="session")
def fpn_shapes():
    """``fpn_shapes(channels)`` -> ShapeSpecs of p2..p6."""
    return _fpn_shapes


@pytest.fixture(scope="session")
def config_paths():
    return {"dir": CONFIG_DIR, "base": BASE, "r50": R50, "tiny_opts": TINY_OPTS}


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Run each test single-threaded: on the shared 2-core machine intra-op threads only
    contend (measured ~8x slower); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
