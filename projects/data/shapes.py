"""`shapes`: a deterministic synthetic instance-segmentation dataset built into the project.

Each image (several sizes and aspect ratios) has a textured background (gradient, stripes or
checks, plus noise) and 1-6 overlapping filled shapes of three classes (circle, square,
triangle) in varied colours, sizes from ~10 px to most of the image. Shapes drawn later occlude
earlier ones, so every annotation is the *visible* region: its polygons come from the
visible mask's contours, its box from those polygons. Objects left with too small a visible
area are dropped. Image ``i`` of a split depends only on ``(split seed, i)``.

Files are written on first use to ``$SHAPES_DATASET_DIR`` (default
``~/.cache/d2_five_methods/shapes``) as PNG images plus a COCO-format json per split, so
`COCOEvaluator` works on ``shapes_val`` like on COCO.
"""
import json
import os
import shutil
import tempfile
from typing import Dict, List, Tuple

import cv2
import numpy as np

__all__ = ["CLASSES", "SPLITS", "dataset_root", "ensure_split", "render_image"]

CLASSES = ["circle", "square", "triangle"]
# split -> (number of images, seed)
SPLITS: Dict[str, Tuple[int, int]] = {"train": (400, 1), "val": (80, 2)}
IMAGE_SIZES = [(128, 128), (96, 160), (160, 96), (128, 192), (144, 112), (112, 144)]  # (h, w)
FORMAT_VERSION = 1  # bump when the generator changes: old caches are then ignored
MIN_VISIBLE_AREA = 40  # px; objects occluded below this are not annotated


def dataset_root() -> str:
    base = os.environ.get("SHAPES_DATASET_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "d2_five_methods", "shapes"
    )
    return os.path.join(base, f"v{FORMAT_VERSION}")


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    kind = rng.integers(3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == 0:  # linear gradient in a random direction
        angle = rng.uniform(0, np.pi)
        t = (np.cos(angle) * xx / w + np.sin(angle) * yy / h + 1) / 2
    elif kind == 1:  # stripes
        period = rng.uniform(6, 24)
        t = (np.sin((xx * np.cos(rng.uniform(0, np.pi)) + yy) * 2 * np.pi / period) + 1) / 2
    else:  # checks
        cell = int(rng.integers(6, 20))
        t = ((xx // cell + yy // cell) % 2).astype(np.float32) * 0.6 + 0.2
    img = c0 * t[..., None] + c1 * (1 - t[..., None])
    img += rng.normal(0, rng.uniform(2, 14), size=img.shape)
    return np.clip(img, 0, 255)


def _shape_mask(rng: np.random.Generator, cls: int, h: int, w: int) -> np.ndarray:
    size = float(np.exp(rng.uniform(np.log(10), np.log(0.7 * min(h, w)))))  # log-uniform
    cx, cy = rng.uniform(size / 2, w - size / 2), rng.uniform(size / 2, h - size / 2)
    mask = np.zeros((h, w), np.uint8)
    if CLASSES[cls] == "circle":
        cv2.circle(mask, (int(round(cx)), int(round(cy))), int(round(size / 2)), 1, -1)
    else:
        n = 4 if CLASSES[cls] == "square" else 3
        angle0 = rng.uniform(0, 2 * np.pi)
        radius = size / 2 if n == 3 else size / np.sqrt(2)
        pts = [
            (cx + radius * np.cos(angle0 + k * 2 * np.pi / n),
             cy + radius * np.sin(angle0 + k * 2 * np.pi / n))
            for k in range(n)
        ]
        cv2.fillPoly(mask, [np.round(np.array(pts)).astype(np.int32)], 1)
    return mask.astype(bool)


def _polygons(mask: np.ndarray) -> List[List[float]]:
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_SIMPLE)
    polys = []
    for c in contours:
        if len(c) >= 3 and cv2.contourArea(c) >= 4:
            # pixel centres -> pixel-corner coordinates (+0.5) as COCO polygons expect
            polys.append((c.reshape(-1, 2).astype(np.float64) + 0.5).flatten().tolist())
    return polys


def render_image(split: str, index: int) -> Tuple[np.ndarray, List[dict]]:
    """Return ``(BGR uint8 image HxWx3, annotations)`` for image ``index`` of ``split``.

    Annotations: dicts with ``category_id`` (0-based), ``segmentation`` (list of polygons,
    absolute XY pixel coords), ``bbox`` (XYWH absolute), ``area`` (visible pixels).
    """
    seed = SPLITS[split][1]
    rng = np.random.default_rng([seed, index])
    h, w = IMAGE_SIZES[int(rng.integers(len(IMAGE_SIZES)))]
    img = _background(rng, h, w)
    n = int(rng.integers(1, 7))
    owner = np.full((h, w), -1, np.int32)  # index of the object visible at each pixel
    classes, colours = [], []
    for k in range(n):
        cls = int(rng.integers(len(CLASSES)))
        mask = _shape_mask(rng, cls, h, w)
        colour = rng.uniform(0, 255, 3)
        # keep the shape distinguishable from the local background
        if np.abs(img[mask].mean(axis=0) - colour).sum() < 120:
            colour = 255 - img[mask].mean(axis=0)
        shade = 1 + rng.normal(0, 0.04, size=(h, w, 1))
        img = np.where(mask[..., None], np.clip(colour * shade, 0, 255), img)
        owner[mask] = k
        classes.append(cls)
        colours.append(colour)
    annotations = []
    for k, cls in enumerate(classes):
        visible = owner == k
        if visible.sum() < MIN_VISIBLE_AREA:
            continue
        polys = _polygons(visible)
        if not polys:
            continue
        xy = np.concatenate([np.array(p).reshape(-1, 2) for p in polys])
        x0, y0 = xy.min(axis=0)
        x1, y1 = xy.max(axis=0)
        annotations.append({
            "category_id": cls,
            "segmentation": polys,
            "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
            "area": float(visible.sum()),
        })
    return img.astype(np.uint8), annotations


def _write_split(split: str, out_dir: str) -> None:
    num, _ = SPLITS[split]
    image_dir = os.path.join(out_dir, split)
    os.makedirs(image_dir)
    images, anns = [], []
    for i in range(num):
        img, objs = render_image(split, i)
        file_name = f"{i:05d}.png"
        cv2.imwrite(os.path.join(image_dir, file_name), img)
        images.append({"id": i + 1, "file_name": file_name, "height": img.shape[0],
                       "width": img.shape[1]})
        for obj in objs:
            anns.append({**obj, "id": len(anns) + 1, "image_id": i + 1, "iscrowd": 0,
                         "category_id": obj["category_id"] + 1})
    coco = {
        "info": {"description": f"shapes_{split} (synthetic, generated by projects.data.shapes)"},
        "images": images,
        "annotations": anns,
        "categories": [{"id": i + 1, "name": n, "supercategory": "shape"}
                       for i, n in enumerate(CLASSES)],
    }
    with open(os.path.join(out_dir, f"{split}.json"), "w") as f:
        json.dump(coco, f)


def ensure_split(split: str) -> Tuple[str, str]:
    """Generate ``split`` if its files are missing; return ``(json_file, image_root)``.

    Safe when several processes call it at once: each generates into a private temporary
    folder and the first to finish moves it into place atomically.
    """
    if split not in SPLITS:
        raise KeyError(f"unknown shapes split {split!r}; available: {sorted(SPLITS)}")
    root = os.path.join(dataset_root(), split)
    json_file, image_root = os.path.join(root, f"{split}.json"), os.path.join(root, split)
    if not os.path.isfile(json_file):
        os.makedirs(dataset_root(), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{split}-", dir=dataset_root())
        try:
            _write_split(split, tmp)
            try:
                os.rename(tmp, root)
            except OSError:  # another process won the race
                if not os.path.isfile(json_file):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return json_file, image_root
