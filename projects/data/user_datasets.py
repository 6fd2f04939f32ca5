"""Users' COCO-format datasets: registration from the command line / config, and the class
list of any registered dataset (for the class-count check).

    --dataset mydata_train=path/to/train.json:path/to/images     (train_net.py and every tool)
    DATASETS.REGISTER_COCO: ("mydata_train=train.json:images",)   (config key, same syntax)

``NAME=ANNOTATIONS.json[:IMAGE_DIR]``: the image folder defaults to the json's folder. Paths
are made absolute when registered. The dataset is registered like Detectron2's
``register_coco_instances`` (lazy ``load_coco_json``, metadata ``json_file``, ``image_root``,
``evaluator_type="coco"``), plus ``thing_classes`` read from the json's categories at once,
and degenerate polygons dropped when loaded (`projects.data.annotations`).
"""
import json
import logging
import os
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog

from .annotations import clean_coco_annotations, warn_dropped

__all__ = ["parse_dataset_spec", "register_coco_instances", "register_datasets",
           "dataset_classes", "DatasetSpecError"]

logger = logging.getLogger(__name__)

SPEC_SYNTAX = "NAME=path/to/annotations.json[:path/to/images]"


class DatasetSpecError(ValueError):
    """A malformed dataset spec, a missing file, or a name clash; the message says which."""


def parse_dataset_spec(spec: str) -> Tuple[str, str, str]:
    """``"NAME=ANN.json[:IMAGES]"`` -> ``(name, json_file, image_root)`` (paths as given).

    The json path ends at the first ``.json:`` (so Windows drive letters and ``:`` in the image
    path are fine); without an image folder, images are looked up next to the json.
    """
    name, sep, rest = str(spec).partition("=")
    name = name.strip()
    if not sep or not name or not rest:
        raise DatasetSpecError(f"dataset spec {spec!r}: expected {SPEC_SYNTAX}")
    lower = rest.lower()
    cut = lower.find(".json:")
    if cut >= 0:
        json_file, image_root = rest[:cut + len(".json")], rest[cut + len(".json:"):]
    elif lower.endswith(".json"):
        json_file, image_root = rest, ""
    else:
        raise DatasetSpecError(
            f"dataset spec {spec!r}: the annotations must be a COCO .json file; expected "
            f"{SPEC_SYNTAX}")
    image_root = image_root or os.path.dirname(json_file) or "."
    return name, json_file, image_root


# --------------------------------------------------------------------------- json reading

_JSON_CACHE: Dict[Tuple[str, float, int], dict] = {}


def _read_coco_json(json_file: str) -> dict:
    """The parsed json (cached by path, mtime and size: it is read once per process)."""
    path = os.path.abspath(json_file)
    try:
        st = os.stat(path)
    except OSError as e:
        raise FileNotFoundError(f"COCO annotation file not found: {json_file}") from e
    key = (path, st.st_mtime, st.st_size)
    if key not in _JSON_CACHE:
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read COCO annotation file {json_file}: {e}") from e
        if not isinstance(data, dict) or not isinstance(data.get("categories"), list):
            raise ValueError(f"COCO annotation file {json_file} has no 'categories' list")
        _JSON_CACHE.clear()  # keep one file's content at most
        _JSON_CACHE[key] = data
    return _JSON_CACHE[key]


def _categories(json_file: str) -> Tuple[List[str], Dict[int, int]]:
    """Class names sorted by category id, and ``{category id: contiguous id}`` (what
    Detectron2's ``load_coco_json`` puts in the metadata)."""
    cats = _read_coco_json(json_file)["categories"]
    try:
        cats = sorted(cats, key=lambda c: int(c["id"]))
        names = [str(c["name"]) for c in cats]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"COCO annotation file {json_file}: every category needs an integer "
                         f"'id' and a 'name' ({e})") from e
    ids = [int(c["id"]) for c in cats]
    if len(set(ids)) != len(ids):
        raise ValueError(f"COCO annotation file {json_file}: duplicate category ids {ids}")
    return names, {cid: i for i, cid in enumerate(ids)}


def _load_clean_coco(json_file: str, image_root: str, dataset_name: str):
    """``load_coco_json`` of ``json_file`` with degenerate polygons dropped (one warning)."""
    from detectron2.data.datasets import load_coco_json

    data = _read_coco_json(json_file)
    _JSON_CACHE.clear()  # loaded once more by load_coco_json below; do not hold it twice
    kept, report = clean_coco_annotations(data.get("annotations", []))
    if not report["polygons"]:
        return load_coco_json(json_file, image_root, dataset_name)
    warn_dropped(f"dataset {dataset_name!r} ({json_file})", report, key=json_file)
    fd, tmp = tempfile.mkstemp(suffix=".json", prefix="clean_coco_")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({**data, "annotations": kept}, f)
        return load_coco_json(tmp, image_root, dataset_name)
    finally:
        os.remove(tmp)


# --------------------------------------------------------------------------- registration


def register_coco_instances(name: str, metadata: Optional[dict], json_file: str,
                            image_root: str) -> None:
    """Detectron2's ``register_coco_instances``, plus: ``thing_classes`` (and the category id
    map) set at once from the json, degenerate polygons dropped when loaded, clear errors for
    missing files. Registering the same name with the same files again does nothing."""
    json_file, image_root = os.path.abspath(json_file), os.path.abspath(image_root)
    if not os.path.isfile(json_file):
        raise DatasetSpecError(f"dataset {name!r}: annotation file not found: {json_file}")
    if not os.path.isdir(image_root):
        raise DatasetSpecError(f"dataset {name!r}: image folder not found: {image_root}")
    if name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name)
        if meta.get("json_file", None) == json_file and meta.get("image_root", None) == image_root:
            return
        raise DatasetSpecError(
            f"dataset name {name!r} is already registered (json_file="
            f"{meta.get('json_file', None)}); choose another name for {json_file}")
    names, id_map = _categories(json_file)
    DatasetCatalog.register(name, lambda: _load_clean_coco(json_file, image_root, name))
    MetadataCatalog.get(name).set(**{
        "thing_classes": names, "thing_dataset_id_to_contiguous_id": id_map,
        **(metadata or {}),
        "json_file": json_file, "image_root": image_root, "evaluator_type": "coco"})


def register_datasets(specs: Sequence[str]) -> List[str]:
    """Register every ``NAME=ANN.json[:IMAGES]`` of ``specs``; returns the names."""
    names = []
    for spec in specs:
        name, json_file, image_root = parse_dataset_spec(spec)
        register_coco_instances(name, {}, json_file, image_root)
        names.append(name)
    return names


# --------------------------------------------------------------------------- class lists


def dataset_classes(name: str) -> Optional[List[str]]:
    """The class names of registered dataset ``name``.

    From its metadata's ``thing_classes`` when set; else, for a COCO-json registration (a
    ``json_file`` in the metadata, e.g. Detectron2's ``register_coco_instances``), the json's
    categories, which are then stored in the metadata exactly as ``load_coco_json`` would;
    else ``None`` after loading the dataset if that does not set them either.

    Raises:
        KeyError: ``name`` is not registered (the message lists how to register it).
    """
    meta = MetadataCatalog.get(name)
    classes = meta.get("thing_classes", None)
    if classes is not None:
        return list(classes)
    if name not in DatasetCatalog.list():
        raise KeyError(
            f"dataset {name!r} is not registered. Register a COCO-format dataset with "
            f"--dataset {name}=path/to/annotations.json:path/to/images (or the config key "
            "DATASETS.REGISTER_COCO), or in Python before building anything; registered: "
            f"{', '.join(sorted(DatasetCatalog.list())[:20])}, ...")
    json_file = meta.get("json_file", None)
    if json_file and os.path.isfile(json_file):
        names, id_map = _categories(json_file)
        meta.thing_classes = names
        if meta.get("thing_dataset_id_to_contiguous_id", None) is None:
            meta.thing_dataset_id_to_contiguous_id = id_map
        return names
    if name not in _LOADED_WITHOUT_CLASSES:
        DatasetCatalog.get(name)  # a custom loader may set thing_classes (as load_coco_json does)
    classes = meta.get("thing_classes", None)
    if classes is None:
        _LOADED_WITHOUT_CLASSES.add(name)  # do not load it again for nothing
    return list(classes) if classes is not None else None


_LOADED_WITHOUT_CLASSES = set()
