"""A small user-style COCO dataset written by the tests: two categories with non-contiguous
ids (3 "disc", 7 "bar"), PNG images of several sizes, polygons for every object, and in each
split three annotations with degenerate polygons (ids 9001-9003, see `DEGENERATE_IDS`)."""
import json
import os

import cv2
import numpy as np

CATEGORIES = [{"id": 7, "name": "bar"}, {"id": 3, "name": "disc"}]  # unsorted on purpose
CLASS_NAMES = ["disc", "bar"]  # contiguous order = sorted by category id
SIZES = [(64, 80), (80, 64), (72, 72), (64, 96)]
# 9001: only a 2-point polygon (dropped); 9002: only a zero-area polygon (dropped);
# 9003: a valid polygon plus a 2-point one (kept, with its valid polygon only)
DEGENERATE_IDS = (9001, 9002, 9003)
DROPPED_IDS = (9001, 9002)


def _disc(cx, cy, r):
    angles = np.arange(12) * (2 * np.pi / 12)
    return np.stack([cx + r * np.cos(angles), cy + r * np.sin(angles)], 1)


def write_split(root, split, num_images, seed):
    """Write ``root/<split>.json`` and ``root/<split>/*.png``; returns (json, image dir)."""
    rng = np.random.default_rng(seed)
    image_dir = os.path.join(root, split)
    os.makedirs(image_dir, exist_ok=True)
    images, anns = [], []
    for i in range(num_images):
        h, w = SIZES[i % len(SIZES)]
        img = np.clip(rng.normal(110, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        objects = []
        for k in range(2):
            if (i + k) % 2 == 0:  # disc
                r = rng.uniform(8, 14)
                cx, cy = rng.uniform(r + 1, w - r - 1), rng.uniform(r + 1, h - r - 1)
                pts, cat, colour = _disc(cx, cy, r), 3, (40, 220, 240)
            else:  # bar
                bw, bh = rng.uniform(20, 34), rng.uniform(6, 10)
                x0, y0 = rng.uniform(1, w - bw - 1), rng.uniform(1, h - bh - 1)
                pts = np.array([[x0, y0], [x0 + bw, y0], [x0 + bw, y0 + bh], [x0, y0 + bh]])
                cat, colour = 7, (230, 60, 30)
            cv2.fillPoly(img, [np.round(pts).astype(np.int32)], colour)
            objects.append((pts, cat))
        file_name = f"img_{i:03d}.png"
        assert cv2.imwrite(os.path.join(image_dir, file_name), img)
        image_id = 100 + i
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        for pts, cat in objects:
            x0, y0 = pts.min(0)
            x1, y1 = pts.max(0)
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat,
                         "segmentation": [pts.flatten().round(2).tolist()], "iscrowd": 0,
                         "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                         "area": float((x1 - x0) * (y1 - y0))})
    first = images[0]["id"]
    anns += [
        {"id": 9001, "image_id": first, "category_id": 3, "iscrowd": 0, "area": 50.0,
         "bbox": [5.0, 5.0, 10.0, 5.0], "segmentation": [[5.0, 5.0, 15.0, 10.0]]},
        {"id": 9002, "image_id": first, "category_id": 7, "iscrowd": 0, "area": 50.0,
         "bbox": [20.0, 20.0, 10.0, 10.0], "segmentation": [[20.0, 20.0, 25.0, 25.0, 30.0, 30.0]]},
        {"id": 9003, "image_id": first, "category_id": 7, "iscrowd": 0, "area": 100.0,
         "bbox": [40.0, 40.0, 10.0, 10.0],
         "segmentation": [[40.0, 40.0, 50.0, 40.0, 50.0, 50.0, 40.0, 50.0], [1.0, 1.0, 2.0, 2.0]]},
    ]
    json_file = os.path.join(root, f"{split}.json")
    with open(json_file, "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": CATEGORIES}, f)
    return json_file, image_dir


def write_dataset(root):
    """``{"train": (json, images), "val": (json, images)}`` of a fresh dataset under root."""
    return {"train": write_split(str(root), "train", 8, 0),
            "val": write_split(str(root), "val", 4, 1)}
