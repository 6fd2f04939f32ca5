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


def test_demo_keeps_going_past_a_corrupt_file(demo, tmp_path, tiny_config):
    torch.manual_seed(0)
    inputs = tmp_path / "in"
    inputs.mkdir()
    good = [_write_image(inputs / f"ok{i}.png", 80, 96, seed=i) for i in (0, 2)]
    (inputs / "ok1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")  # sorted between the two
    out = tmp_path / "out"
    with pytest.raises(ToolError, match=r"1 of 3 inputs could not be read:\n  .*ok1\.png"):
        demo.main(["--config-file", tiny_config, "--input", str(inputs), "--output", str(out),
                   "--confidence-threshold", "0.0"])
    with open(out / "predictions.json") as f:
        saved = json.load(f)
    assert sorted(saved) == good  # the images before and after the corrupt one
    assert sorted(os.listdir(out)) == ["ok0.png", "ok2.png", "predictions.json"]


def test_shown_detections_threshold_or_top_k(demo):
    from detectron2.structures import Boxes, Instances

    inst = Instances((10, 10))
    inst.scores = torch.tensor([0.2, 0.9, 0.05, 0.6])
    inst.pred_boxes = Boxes(torch.zeros(4, 4))
    shown, fell_back = demo.select_shown(inst, 0.5, 3)
    assert shown.scores.tolist() == pytest.approx([0.9, 0.6]) and not fell_back
    shown, fell_back = demo.select_shown(inst, 0.95, 3)  # none >= 0.95: the 3 best
    assert shown.scores.tolist() == pytest.approx([0.9, 0.6, 0.2]) and fell_back
    shown, _ = demo.select_shown(inst, 0.95, 0)
    assert len(shown) == 0
