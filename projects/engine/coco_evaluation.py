"""`COCOEvaluator` whose ground truth follows the training rule for degenerate polygons."""
from detectron2.evaluation import COCOEvaluator as _D2COCOEvaluator

from ..data.annotations import clean_coco_annotations, warn_dropped

__all__ = ["COCOEvaluator"]


class COCOEvaluator(_D2COCOEvaluator):
    """Detectron2's `COCOEvaluator`; its ground truth drops degenerate polygons (fewer than 3
    points, zero area) and annotations left without a polygon, as training does
    (`projects.data.annotations`). pycocotools crashes on a polygon of fewer than 3 points
    (``TypeError: Argument 'bb' has incorrect type``) in mask evaluation."""

    def __init__(self, dataset_name, *args, **kwargs):
        super().__init__(dataset_name, *args, **kwargs)
        coco = self._coco_api
        kept, report = clean_coco_annotations(coco.dataset.get("annotations", []))
        if report["polygons"]:
            source = self._metadata.get("json_file", dataset_name)
            # one warning per json: loading the dataset for training/inference may have given it
            warn_dropped(f"evaluation ground truth of {dataset_name!r} ({source})", report,
                         key=source)
            coco.dataset["annotations"] = kept
            coco.createIndex()
