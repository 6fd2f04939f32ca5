"""Degenerate polygons: one rule for training and evaluation.

A COCO polygon ``[x0, y0, x1, y1, ...]`` is *degenerate* when it has fewer than 3 points (or
an odd number of coordinates) or encloses zero area (shoelace formula; e.g. all points on one
line). Such a polygon has no pixels: as a training target it teaches an empty mask, and
pycocotools cannot even convert one with fewer than 3 points (``TypeError: Argument 'bb' has
incorrect type`` in mask evaluation).

Both sides drop degenerate polygons, and drop an annotation whose polygons are all
degenerate (as Detectron2's ``load_coco_json`` already does for polygons with fewer than 3
points), so a model is trained and evaluated on the same objects:

* training: datasets registered with `projects.data.register_coco_instances` (or
  ``--dataset`` / ``DATASETS.REGISTER_COCO``) are cleaned when loaded, with one warning that
  counts what was dropped and names the first annotation ids; `CheckedDatasetMapper` applies
  the same rule per image to datasets registered any other way;
* evaluation: `projects.engine.coco_evaluation.COCOEvaluator` cleans its ground truth the same
  way before pycocotools sees it.
"""
import logging
from typing import List, Sequence, Tuple

__all__ = ["is_degenerate_polygon", "clean_segmentation", "clean_coco_annotations",
           "warn_dropped"]

logger = logging.getLogger(__name__)

MAX_IDS_NAMED = 5


def _polygon_area(poly: Sequence[float]) -> float:
    xs, ys = poly[0::2], poly[1::2]
    n = len(xs)
    return 0.5 * abs(sum(xs[i] * ys[(i + 1) % n] - xs[(i + 1) % n] * ys[i] for i in range(n)))


def is_degenerate_polygon(poly) -> bool:
    """Whether a flat COCO polygon has fewer than 3 points, an odd length, or zero area."""
    try:
        coords = [float(v) for v in poly]
    except (TypeError, ValueError):
        return True
    return len(coords) < 6 or len(coords) % 2 == 1 or _polygon_area(coords) == 0.0


def clean_segmentation(segmentation):
    """``(segmentation without degenerate polygons, number dropped)``.

    Only polygon lists are changed; RLE dicts (and a missing segmentation) are returned as is.
    An empty list returned for a non-empty polygon list means: no valid polygon left.
    """
    if not isinstance(segmentation, list) or not segmentation:
        return segmentation, 0
    kept = [p for p in segmentation if not is_degenerate_polygon(p)]
    return kept, len(segmentation) - len(kept)


def clean_coco_annotations(annotations: List[dict]) -> Tuple[List[dict], dict]:
    """Drop degenerate polygons from COCO-json annotations (dicts with ``id`` and
    ``segmentation``), and annotations left without any polygon.

    Returns:
        ``(kept annotations, report)``; report: ``{"polygons": number of polygons dropped,
        "annotations": number of annotations dropped, "ids": ids of the annotations
        concerned}``. Annotations are not modified in place (changed ones are copied).
    """
    kept, report = [], {"polygons": 0, "annotations": 0, "ids": []}
    for ann in annotations:
        segm, dropped = clean_segmentation(ann.get("segmentation"))
        if not dropped:
            kept.append(ann)
            continue
        report["polygons"] += dropped
        report["ids"].append(ann.get("id"))
        if segm:
            kept.append({**ann, "segmentation": segm})
        else:
            report["annotations"] += 1
    return kept, report


_WARNED = set()


def warn_dropped(source: str, report: dict, key=None) -> None:
    """Log one warning for ``report`` (see `clean_coco_annotations`), if anything was dropped
    and nothing was reported for ``key`` (e.g. the json file) before in this process."""
    if not report["polygons"] or (key is not None and key in _WARNED):
        return
    if key is not None:
        _WARNED.add(key)
    ids = ", ".join(str(i) for i in report["ids"][:MAX_IDS_NAMED])
    more = ", ..." if len(report["ids"]) > MAX_IDS_NAMED else ""
    logger.warning(
        "%s: dropped %d degenerate polygon(s) (fewer than 3 points or zero area) in %d "
        "annotation(s), %d of which had no polygon left and were dropped; annotation ids: %s%s",
        source, report["polygons"], len(report["ids"]), report["annotations"], ids, more)
