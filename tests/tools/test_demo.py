"""tools/demo.py: input collection, threshold routing, errors, and an end-to-end run of a tiny
untrained model on generated images."""
import json
import os

import cv2
import numpy as np
import pytest
import torch

from projects.tools_common import ToolError, setup_cfg


@pytest.fixture(scope="module")
def demo(load_tool):
    return load_tool("demo")


def _write_image(path, h=96, w=128, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    cv2.circle(img, (w // 2, h // 2), h // 4, (0, 0, 255), -1)
    assert cv2.imwrite(str(path), img)
    return str(path)


def test_collect_inputs_file_folder_glob(demo, tmp_path):
    a = _write_image(tmp_path / "a.png")
    sub = tmp_path / "sub"
    sub.mkdir()
    b = _write_image(sub / "b.jpg")
    c = _write_image(sub / "c.png")
    (sub / "notes.txt").write_text("not an image")
    files = demo.collect_inputs([a, str(sub), str(tmp_path / "*.png"), str(sub / "c.*")])
    assert files == [a, b, c]  # de-duplicated, folder sorted, text file skipped
    assert demo.collect_inputs([str(sub)], max_images=1) == [b]


def test_collect_inputs_errors_name_the_input(demo, tmp_path):
    missing = str(tmp_path / "nope.png")
    with pytest.raises(ToolError, match="nope.png"):
        demo.collect_inputs([missing])
    with pytest.raises(ToolError, match=r"\*\.jpg"):
        demo.collect_inputs([str(tmp_path / "*.jpg")])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ToolError, match="empty"):
        demo.collect_inputs([str(empty)])


def test_unreadable_image_error_names_file(demo, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(ToolError, match="broken.png"):
        demo.read_bgr(str(bad))


def test_missing_weights_file_is_named(demo, tmp_path, tiny_config):
    cfg = setup_cfg(tiny_config, ["MODEL.WEIGHTS", str(tmp_path / "model_final.pth")])
    with pytest.raises(ToolError, match="model_final.pth"):
        demo.run(cfg, [])


def test_confidence_threshold_routed_to_every_method_key(demo, tiny_config):
    cfg = setup_cfg(tiny_config, freeze=False)
    keys = demo.set_confidence_threshold(cfg, 0.37)
    assert cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST == pytest.approx(0.37)
    assert cfg.MODEL.RETINANET.SCORE_THRESH_TEST == pytest.approx(0.37)
    assert "MODEL.ROI_HEADS.SCORE_THRESH_TEST" in keys
    assert "MODEL.RETINANET.SCORE_THRESH_TEST" in keys
    if "SCORE_THRESH_TEST" in cfg.MODEL.get("RDSNET", {}):
        assert cfg.MODEL.RDSNET.SCORE_THRESH_TEST == pytest.approx(0.37)
        assert "MODEL.RDSNET.SCORE_THRESH_TEST" in keys
    with pytest.raises(ToolError, match="confidence-threshold"):
        demo.set_confidence_threshold(cfg, 1.5)


def test_demo_end_to_end_writes_visualisations(demo, tmp_path, tiny_config):
    torch.manual_seed(0)
    inputs = tmp_path / "in"
    inputs.mkdir()
    paths = [_write_image(inputs / f"img{i}.png", 80 + 16 * i, 112, seed=i) for i in range(3)]
    out = tmp_path / "out"
    # threshold 0: an untrained model still outputs (low-score) detections to draw
    results = demo.main(["--config-file", tiny_config, "--input", str(inputs / "*.png"),
                         "--output", str(out), "--confidence-threshold", "0.0",
                         "--max-images", "2"])
    assert list(results) == paths[:2]
    for p in paths[:2]:
        vis = cv2.imread(str(out / os.path.basename(p)))
        assert vis is not None and vis.shape[:2] == cv2.imread(p).shape[:2]
    assert not (out / "img2.png").exists()  # --max-images 2
    with open(out / "predictions.json") as f:
        saved = json.load(f)
    records = [r for p in paths[:2] for r in saved[p]]
    assert records, "threshold 0 should keep some detections"
    # class names come from the test dataset's metadata (shapes_val)
    assert {r["class"] for r in records} <= {"circle", "square", "triangle"}
    for r in records:
        x0, y0, x1, y1 = r["bbox"]
        assert 0 <= r["score"] <= 1 and x0 <= x1 and y0 <= y1
