import importlib.machinery

import pytest
from detectron2 import _C

import projects
from projects.testing import TINY_RCNN_OPTS, TINY_RESNET_OPTS

QUICKSTART = projects.model_zoo.get_config_file("quickstart/mask_rcnn_R_18_FPN_shapes.yaml")

# Which Detectron2 the suite runs on, judged from the extension file itself: a compiled
# `detectron2._C` (the supported compiled platform: Detectron2 main built from source), or the
# installer's pure-Python fallback (Detectron2 v0.6 with a `_C.py` stand-in). Tests with a
# compiled and a fallback branch assert the branch chosen here.
COMPILED_DETECTRON2 = isinstance(getattr(_C, "__loader__", None),
                                 importlib.machinery.ExtensionFileLoader)


def cli_opts(opts):
    """Python-valued KEY VALUE overrides as command-line strings."""
    return [str(v) for v in opts]


@pytest.fixture
def tiny_cfg():
    return projects.load_config(QUICKSTART, TINY_RESNET_OPTS + TINY_RCNN_OPTS)
