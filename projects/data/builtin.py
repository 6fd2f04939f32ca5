"""Registration of the built-in `shapes_train` / `shapes_val` datasets.

The COCO-format files are generated lazily (first `DatasetCatalog.get`, or when an evaluator
asks for the json), so importing the package costs nothing. COCO 2017 and the other Detectron2
built-ins stay registered by Detectron2 itself under ``$DETECTRON2_DATASETS``.
"""
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from . import shapes

__all__ = ["register_shapes", "shapes_image_glob", "prepare_dataset_files"]


def _load(split: str):
    json_file, image_root = shapes.ensure_split(split)
    return load_coco_json(json_file, image_root, f"shapes_{split}")


def register_shapes() -> None:
    """Register ``shapes_<split>`` for every split (idempotent)."""
    for split in shapes.SPLITS:
        name = f"shapes_{split}"
        if name in DatasetCatalog.list():
            continue
        DatasetCatalog.register(name, lambda split=split: _load(split))
        root = os.path.join(shapes.dataset_root(), split)
        MetadataCatalog.get(name).set(
            thing_classes=list(shapes.CLASSES),
            json_file=os.path.join(root, f"{split}.json"),
            image_root=os.path.join(root, split),
            evaluator_type="coco",
        )


def prepare_dataset_files(dataset_name: str) -> None:
    """Make sure a built-in dataset's files exist before e.g. an evaluator opens its json."""
    if dataset_name.startswith("shapes_") and dataset_name[len("shapes_"):] in shapes.SPLITS:
        shapes.ensure_split(dataset_name[len("shapes_"):])


def shapes_image_glob(dataset_name: str = "shapes_val") -> str:
    """A glob matching the images of a shapes split (generating them if needed)."""
    prepare_dataset_files(dataset_name)
    return os.path.join(MetadataCatalog.get(dataset_name).image_root, "*.png")
