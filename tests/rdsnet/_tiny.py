"""Tiny RDSNet configs for the tests (ResNet-18, 64-channel FPN and streams, 3 classes)."""
import os

from projects.testing import TINY_RESNET_OPTS, load_config, repo_root

CONFIG_DIR = os.path.join(repo_root(), "configs", "rdsnet")

# Anchors of half RetinaNet's size (shapes objects are ~15-80 px in 96-192 px images).
TINY_RDSNET_OPTS = TINY_RESNET_OPTS + [
    "MODEL.RDSNET.NUM_CLASSES", 3,
    "MODEL.RDSNET.PIXEL_CONV_DIM", 64,
    "MODEL.ANCHOR_GENERATOR.SIZES",
    [[16, 20.16, 25.4], [32, 40.3, 50.8], [64, 80.6, 101.6], [128, 161.3, 203.2], [256, 322.5, 406.4]],
]


def tiny_cfg(config="rdsnet_R_50_FPN_1x.yaml", opts=()):
    """A tiny CPU config on `shapes` from one of the package's YAMLs (unfrozen)."""
    return load_config(os.path.join(CONFIG_DIR, config), TINY_RDSNET_OPTS + list(opts))


def train_and_evaluate(cfg, output_dir):
    """`projects.testing.train_and_evaluate` (re-exported for the tests of this directory)."""
    from projects.testing import train_and_evaluate as run

    return run(cfg, output_dir)
