"""tools/visualize_data.py: both sources write exactly `--num` readable images."""
import os

import cv2
import pytest

from projects.tools_common import ToolError, setup_cfg


@pytest.fixture(scope="module")
def vis(load_tool):
    return load_tool("visualize_data")


def _check_written(paths, out, num):
    assert len(paths) == num
    assert sorted(os.listdir(out)) == sorted(os.path.basename(p) for p in paths)
    for p in paths:
        img = cv2.imread(p)
        assert img is not None and img.ndim == 3 and img.shape[2] == 3
        assert img.std() > 0  # not a blank canvas


def test_annotation_source_writes_num_images(vis, tmp_path, tiny_config):
    out = tmp_path / "ann"
    paths = vis.main(["--config-file", tiny_config, "--source", "annotation",
                      "--output-dir", str(out), "--num", "3"])
    _check_written(paths, out, 3)
    # raw dataset images keep their original size (shapes images are 96-192 px)
    h, w = cv2.imread(paths[0]).shape[:2]
    assert 96 <= min(h, w) and max(h, w) <= 192


def test_dataloader_source_is_bounded(vis, tmp_path, tiny_config):
    out = tmp_path / "loader"
    # IMS_PER_BATCH 2: 3 images need two batches of the infinite training loader
    paths = vis.main(["--config-file", tiny_config, "--source", "dataloader",
                      "--output-dir", str(out), "--num", "3"])
    _check_written(paths, out, 3)
    # training images are resized by the mapper: shortest edge MIN_SIZE_TRAIN = 64
    assert min(cv2.imread(paths[0]).shape[:2]) == 64


def test_bad_num_and_missing_config(vis, tmp_path, tiny_config):
    cfg = setup_cfg(tiny_config)
    with pytest.raises(ToolError, match="--num"):
        vis.run(cfg, "annotation", str(tmp_path / "x"), 0)
    with pytest.raises(ToolError, match="missing.yaml"):
        vis.main(["--config-file", str(tmp_path / "missing.yaml"), "--source", "annotation",
                  "--output-dir", str(tmp_path / "y")])
