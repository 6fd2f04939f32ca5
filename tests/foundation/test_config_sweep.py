"""Every shipped config loads with `projects.get_cfg()`, builds its model and runs one training
iteration on CPU at a small input size (SWEEP_OPTS shrink only inputs, batch and dataset).
Parametrised over the files, so each method's configs join automatically."""
import os

import pytest

import projects
from projects.testing import SWEEP_OPTS, load_config, run_one_training_iteration

CONFIGS = projects.model_zoo.list_configs()


def test_configs_are_shipped():
    assert "quickstart/mask_rcnn_R_18_FPN_shapes.yaml" in CONFIGS
    assert len(CONFIGS) >= 4


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds_and_trains_one_iteration(name):
    cfg = load_config(projects.model_zoo.get_config_file(name), SWEEP_OPTS)
    losses = run_one_training_iteration(cfg)
    assert losses, f"{name}: the model returned no losses"
    assert all(v == v and abs(v) < float("inf") for v in losses.values()), losses


def test_base_chains_stay_inside_the_package():
    root = os.path.dirname(projects.model_zoo.get_config_file(CONFIGS[0]))
    root = os.path.dirname(root)
    for dirpath, _, files in os.walk(root, followlinks=True):
        for f in files:
            if not f.endswith(".yaml"):
                continue
            with open(os.path.join(dirpath, f)) as fh:
                for line in fh:
                    if line.startswith("_BASE_"):
                        target = line.split(":", 1)[1].strip().strip("\"'")
                        path = os.path.normpath(os.path.join(dirpath, target))
                        assert os.path.isfile(path), f"{f}: _BASE_ {target} does not exist"
                        assert path.startswith(root), f"{f}: _BASE_ {target} leaves configs/"
