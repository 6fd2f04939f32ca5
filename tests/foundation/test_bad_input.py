"""Bad input gets a clear error that names the file / key / value, or is handled."""
import copy

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from detectron2.structures import BoxMode
from detectron2.utils.events import EventStorage

import projects
from projects.data import CheckedDatasetMapper
from projects.engine import Trainer

from .conftest import QUICKSTART


def _record(file_name, annotations=()):
    return {"file_name": str(file_name), "image_id": 7, "height": 64, "width": 80,
            "annotations": list(annotations)}


def _box(x0, y0, w, h, cls=0):
    poly = [x0, y0, x0 + w, y0, x0 + w, y0 + h, x0, y0 + h]
    return {"bbox": [x0, y0, w, h], "bbox_mode": BoxMode.XYWH_ABS, "category_id": cls,
            "segmentation": [poly], "iscrowd": 0}


def test_missing_image_file_is_named(tiny_cfg, tmp_path):
    mapper = CheckedDatasetMapper(tiny_cfg, is_train=True)
    missing = tmp_path / "nope.png"
    with pytest.raises(OSError, match="nope.png"):
        mapper(_record(missing, [_box(4, 4, 20, 20)]))


def test_corrupt_image_file_is_named(tiny_cfg, tmp_path):
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    mapper = CheckedDatasetMapper(tiny_cfg, is_train=False)
    with pytest.raises(OSError, match="corrupt.png"):
        mapper(_record(bad))


def test_degenerate_box_is_dropped_and_the_rest_kept(tiny_cfg, tmp_path):
    path = tmp_path / "ok.png"
    cv2.imwrite(str(path), np.full((64, 80, 3), 127, np.uint8))
    mapper = CheckedDatasetMapper(tiny_cfg, is_train=True)
    degenerate = _box(10, 10, 0, 15)
    degenerate["segmentation"] = [[10, 10, 10, 10, 10, 25]]
    out = mapper(_record(path, [_box(4, 4, 30, 20, cls=1), degenerate]))
    inst = out["instances"]
    assert len(inst) == 1 and inst.gt_classes.tolist() == [1]


def test_image_with_no_objects_gives_finite_losses(tiny_cfg, tmp_path):
    path = tmp_path / "empty.png"
    cv2.imwrite(str(path), np.full((64, 80, 3), 90, np.uint8))
    mapper = CheckedDatasetMapper(tiny_cfg, is_train=True)
    batch = [mapper(_record(path)), mapper(_record(path, [_box(8, 8, 30, 30, cls=2)]))]
    assert len(batch[0]["instances"]) == 0
    torch.manual_seed(0)
    model = build_model(tiny_cfg)
    model.train()
    with EventStorage(0):
        losses = model(batch)
        total = sum(losses.values())
        total.backward()
    assert torch.isfinite(total), losses


def test_mistyped_config_key_names_key_and_suggests(tmp_path):
    with pytest.raises(KeyError, match=r"NUM_CLASES.*did you mean MODEL\.ROI_HEADS\.NUM_CLASSES"):
        projects.load_config(QUICKSTART, ["MODEL.ROI_HEADS.NUM_CLASES", "3"])
    bad_yaml = tmp_path / "typo.yaml"
    bad_yaml.write_text(f'_BASE_: "{QUICKSTART}"\nSOLVER:\n  BASE_LRR: 0.1\n')
    with pytest.raises(KeyError, match=r"typo\.yaml.*BASE_LRR.*SOLVER\.BASE_LR"):
        projects.load_config(str(bad_yaml))
    with pytest.raises(ValueError, match="KEY VALUE pairs"):
        projects.load_config(QUICKSTART, ["SOLVER.BASE_LR"])


def test_class_count_mismatch_is_a_clear_error(tiny_cfg):
    cfg = copy.deepcopy(tiny_cfg)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 80
    with pytest.raises(ValueError, match=r"MODEL.ROI_HEADS.NUM_CLASSES=80.*'shapes_train' has 3"):
        Trainer.build_train_loader(cfg)
    with pytest.raises(ValueError, match=r"'shapes_val' has 3"):
        Trainer.build_test_loader(cfg, "shapes_val")


def test_unknown_dataset_and_config_names_are_clear():
    with pytest.raises(FileNotFoundError, match="did you mean"):
        projects.model_zoo.get_config_file("quickstart/mask_rcnn_R_18_FPN_shape.yaml")
    with pytest.raises(KeyError, match="shapes_tran"):
        DatasetCatalog.get("shapes_tran")


def test_amp_without_cuda_is_a_clear_error(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only machine
    cfg = tiny_cfg.clone()
    cfg.merge_from_list(["SOLVER.AMP.ENABLED", True, "OUTPUT_DIR", str(tmp_path)])
    with pytest.raises(ValueError, match="SOLVER.AMP.ENABLED=True needs CUDA"):
        Trainer(cfg)


def test_mapper_drops_degenerate_polygons_of_any_registration(tiny_cfg, tmp_path):
    """Datasets registered without the project's loader: the mapper applies the same rule."""
    path = tmp_path / "ok.png"
    cv2.imwrite(str(path), np.full((64, 80, 3), 127, np.uint8))
    mapper = CheckedDatasetMapper(tiny_cfg, is_train=True)
    zero_area = _box(10, 10, 20, 20, cls=1)
    zero_area["segmentation"] = [[10, 10, 20, 20, 30, 30]]  # 3 collinear points
    mixed = _box(40, 30, 20, 20, cls=2)
    mixed["segmentation"].append([1, 1, 3, 3])  # a valid square plus a 2-point polygon
    out = mapper(_record(path, [_box(4, 4, 30, 20, cls=0), zero_area, mixed]))
    inst = out["instances"]
    assert inst.gt_classes.tolist() == [0, 2]
    assert [len(p) for p in inst.gt_masks.polygons] == [1, 1]
