import pytest

import projects
from projects.testing import TINY_RCNN_OPTS, TINY_RESNET_OPTS

QUICKSTART = projects.model_zoo.get_config_file("quickstart/mask_rcnn_R_18_FPN_shapes.yaml")


def cli_opts(opts):
    """Python-valued KEY VALUE overrides as command-line strings."""
    return [str(v) for v in opts]


@pytest.fixture
def tiny_cfg():
    return projects.load_config(QUICKSTART, TINY_RESNET_OPTS + TINY_RCNN_OPTS)
