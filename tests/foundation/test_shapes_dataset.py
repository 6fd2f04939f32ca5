"""The built-in `shapes` dataset: deterministic, varied, valid COCO annotations."""
import json
import os

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode, PolygonMasks

import projects  # noqa: F401 (registers shapes_*)
from projects.data import shapes


def test_rendering_is_deterministic():
    for i in (0, 7):
        a_img, a_ann = shapes.render_image("train", i)
        b_img, b_ann = shapes.render_image("train", i)
        assert np.array_equal(a_img, b_img) and a_ann == b_ann
    assert not np.array_equal(shapes.render_image("train", 0)[0], shapes.render_image("val", 0)[0])


def test_registered_splits_and_metadata():
    for name in ("shapes_train", "shapes_val"):
        assert name in DatasetCatalog.list()
        assert MetadataCatalog.get(name).thing_classes == ["circle", "square", "triangle"]


def test_dataset_variety_and_valid_annotations():
    dicts = DatasetCatalog.get("shapes_val")
    assert len(dicts) == shapes.SPLITS["val"][0]
    sizes = {(d["height"], d["width"]) for d in dicts}
    assert len(sizes) >= 4 and len({round(w / h, 2) for h, w in sizes}) >= 3
    anns = [a for d in dicts for a in d["annotations"]]
    assert {a["category_id"] for a in anns} == {0, 1, 2}
    areas = np.array([a["bbox"][2] * a["bbox"][3] for a in anns])
    assert areas.min() < 32 ** 2 and areas.max() > 64 ** 2  # small to large objects
    assert sum(len(d["annotations"]) > 1 for d in dicts) > len(dicts) // 2
    for d in dicts:
        assert os.path.isfile(d["file_name"])
        for a in d["annotations"]:
            assert a["bbox_mode"] == BoxMode.XYWH_ABS
            x, y, w, h = a["bbox"]
            assert w > 0 and h > 0 and x >= 0 and y >= 0
            assert x + w <= d["width"] + 1 and y + h <= d["height"] + 1
            assert all(len(p) >= 6 and len(p) % 2 == 0 for p in a["segmentation"])
            assert PolygonMasks([a["segmentation"]]).area()[0] > 0


def test_overlaps_are_modal(tmp_path):
    # an object hidden under a later one is either dropped or annotated with its visible part
    found = 0
    for i in range(40):
        img, anns = shapes.render_image("train", i)
        for a in anns:
            found += a["area"] < a["bbox"][2] * a["bbox"][3]
    assert found > 0


def test_json_written_to_overridable_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SHAPES_DATASET_DIR", str(tmp_path))
    monkeypatch.setitem(shapes.SPLITS, "val", (5, 2))
    json_file, image_root = shapes.ensure_split("val")
    assert json_file.startswith(str(tmp_path))
    coco = json.load(open(json_file))
    assert [c["name"] for c in coco["categories"]] == shapes.CLASSES
    assert len(coco["images"]) == 5 and len(os.listdir(image_root)) == 5
    # a second call reuses the files
    mtime = os.path.getmtime(json_file)
    shapes.ensure_split("val")
    assert os.path.getmtime(json_file) == mtime
