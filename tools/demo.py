#!/usr/bin/env python
"""Run a trained model of any of the five methods on images and write visualised predictions.

Examples:
    python tools/demo.py --config-file configs/quickstart/mask_rcnn_R_18_FPN_shapes.yaml \\
        --input photo.jpg images/ "more/*.png" --output out/vis --confidence-threshold 0.5 \\
        --opts MODEL.WEIGHTS output/model_final.pth

`--input` takes image files, folders (their images, not recursive) and glob patterns (quote
them); several values are allowed. Images are read as BGR and fed to Detectron2's
`DefaultPredictor` (which resizes with INPUT.MIN_SIZE_TEST/MAX_SIZE_TEST and converts to
INPUT.FORMAT). Class names come from the metadata of the config's first test dataset
(`MetadataCatalog.get(cfg.DATASETS.TEST[0])`). With `--output`, one visualised image per input
(same file name) and `predictions.json` (class names, scores, XYXY boxes in input-image
pixels) are written there; without it, only a per-image summary is printed.
"""
import argparse
import glob
import json
import logging
import os
import sys
import time


from projects.tools_common import ToolError, add_config_args, setup_cfg

logger = logging.getLogger("tools.demo")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# Score-threshold keys of the methods; `--confidence-threshold` sets each one the config has.
SCORE_THRESH_KEYS = (
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST",  # R-CNN family: Faster/Mask, TSD, Dynamic, Decoupled
    "MODEL.RETINANET.SCORE_THRESH_TEST",  # RetinaNet
    "MODEL.RDSNET.SCORE_THRESH_TEST",  # RDSNet (one-stage detection branch)
    "MODEL.PANOPTIC_FPN.COMBINE.INSTANCES_CONFIDENCE_THRESH",  # panoptic FPN
)


def get_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help="image files, folders and/or glob patterns")
    parser.add_argument("--output", default="", metavar="DIR",
                        help="folder for visualised images and predictions.json")
    parser.add_argument("--confidence-threshold", type=float, default=0.5,
                        help="minimum score of shown detections (sets every method's "
                             "SCORE_THRESH_TEST key present in the config)")
    parser.add_argument("--max-images", type=int, default=0, metavar="N",
                        help="process at most N images (0: all)")
    return add_config_args(parser)


def collect_inputs(inputs, max_images=0):
    """Expand `inputs` (files, folders, glob patterns) into a sorted, de-duplicated file list.

    Raises:
        ToolError: an input is missing, a folder/pattern has no image.
    """
    files = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(
                os.path.join(item, f) for f in os.listdir(item)
                if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(item, f))
            )
            if not found:
                raise ToolError(f"input folder {item} contains no image "
                                f"({', '.join(IMAGE_EXTENSIONS)})")
        elif glob.has_magic(item):
            found = sorted(f for f in glob.glob(os.path.expanduser(item)) if os.path.isfile(f))
            if not found:
                raise ToolError(f"input pattern {item} matches no file")
        elif os.path.isfile(item):
            found = [item]
        else:
            raise ToolError(f"input file not found: {item}")
        files.extend(f for f in found if f not in files)
    if max_images and max_images > 0:
        files = files[:max_images]
    return files


def set_confidence_threshold(cfg, threshold):
    """Set every score-threshold key of SCORE_THRESH_KEYS that `cfg` has (cfg unfrozen)."""
    if not 0.0 <= threshold <= 1.0:
        raise ToolError(f"--confidence-threshold must be in [0, 1], got {threshold}")
    done = []
    for key in SCORE_THRESH_KEYS:
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = node.get(p) if hasattr(node, "get") else None
            if node is None:
                break
        if node is not None and leaf in node:
            node[leaf] = threshold
            done.append(key)
    return done


def read_bgr(path):
    from detectron2.data.detection_utils import read_image

    try:
        return read_image(path, format="BGR")
    except Exception as e:  # noqa: BLE001  (PIL raises several types)
        raise ToolError(f"cannot read image {path}: {type(e).__name__}: {e}") from e


def instances_to_records(instances, class_names):
    """Plain-Python predictions: list of {"class", "category_id", "score", "bbox" (XYXY)}."""
    records = []
    boxes = instances.pred_boxes.tensor.tolist() if instances.has("pred_boxes") else []
    scores = instances.scores.tolist() if instances.has("scores") else []
    classes = instances.pred_classes.tolist() if instances.has("pred_classes") else []
    for box, score, cls in zip(boxes, scores, classes):
        name = class_names[cls] if class_names and cls < len(class_names) else str(cls)
        records.append({"class": name, "category_id": int(cls), "score": round(float(score), 4),
                        "bbox": [round(float(v), 2) for v in box]})
    return records


def run(cfg, files, output=""):
    """Predict on `files` with `cfg` and write visualisations to `output` (if set).

    Returns:
        dict: file path -> list of prediction records (see `instances_to_records`).
    """
    from detectron2.data import MetadataCatalog
    from detectron2.engine import DefaultPredictor
    from detectron2.utils.visualizer import ColorMode, Visualizer

    metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0] if len(cfg.DATASETS.TEST) else "__unused")
    class_names = metadata.get("thing_classes", None)
    weights = cfg.MODEL.WEIGHTS
    if not weights:
        logger.warning("MODEL.WEIGHTS is empty: predicting with a randomly initialised model")
    elif "://" not in weights and not os.path.isfile(weights):
        raise ToolError(f"MODEL.WEIGHTS file not found: {weights}")
    predictor = DefaultPredictor(cfg)
    if output:
        os.makedirs(output, exist_ok=True)
    results, used_names = {}, set()
    for path in files:
        image = read_bgr(path)
        start = time.perf_counter()
        predictions = predictor(image)
        elapsed = time.perf_counter() - start
        instances = predictions["instances"].to("cpu") if "instances" in predictions else None
        records = instances_to_records(instances, class_names) if instances is not None else []
        results[path] = records
        logger.info("%s: %d instances in %.2fs", path, len(records), elapsed)
        if output:
            visualizer = Visualizer(image[:, :, ::-1], metadata, instance_mode=ColorMode.IMAGE)
            if instances is not None:
                vis = visualizer.draw_instance_predictions(instances)
            elif "sem_seg" in predictions:
                vis = visualizer.draw_sem_seg(predictions["sem_seg"].argmax(dim=0).to("cpu"))
            else:
                vis = visualizer.output
            name = os.path.basename(path)
            stem, ext = os.path.splitext(name)
            k = 1
            while name in used_names:  # same file name from two folders
                name = f"{stem}_{k}{ext}"
                k += 1
            used_names.add(name)
            vis.save(os.path.join(output, name))
    if output:
        with open(os.path.join(output, "predictions.json"), "w") as f:
            json.dump(results, f, indent=1)
    return results


def main(argv=None):
    args = get_parser().parse_args(argv)
    from detectron2.utils.logger import setup_logger

    setup_logger(name="tools.demo", abbrev_name="demo")
    setup_logger(name="projects", abbrev_name="projects")
    cfg = setup_cfg(args.config_file, args.opts, freeze=False)
    keys = set_confidence_threshold(cfg, args.confidence_threshold)
    logger.info("confidence threshold %.3f -> %s", args.confidence_threshold, ", ".join(keys))
    cfg.freeze()
    files = collect_inputs(args.input, args.max_images)
    results = run(cfg, files, args.output)
    n = sum(len(v) for v in results.values())
    print(f"{len(results)} images, {n} instances"
          + (f"; visualisations in {args.output}" if args.output else ""))
    return results


if __name__ == "__main__":
    try:
        main()
    except ToolError as e:
        sys.exit(f"error: {e}")
