#!/usr/bin/env python
"""Run a trained model of any of the five methods on images and write visualised predictions.

Examples:
    python tools/demo.py --config-file configs/quickstart/mask_rcnn_R_18_FPN_shapes.yaml \\
        --input photo.jpg images/ "more/*.png" --output out/vis --confidence-threshold 0.5 \\
        --opts MODEL.WEIGHTS output/model_final.pth

    # a model trained on your own COCO-format dataset (class names from its json)
    python tools/demo.py --config-file CFG --dataset mydata_val=val.json:images \\
        --input photos/ --output out/vis --opts MODEL.WEIGHTS model_final.pth \\
        DATASETS.TEST "('mydata_val',)" MODEL.ROI_HEADS.NUM_CLASSES 2

`--input` takes image files, folders (their images, not recursive) and glob patterns (quote
them); several values are allowed. Images are read with `projects.data.read_image` (the reader
of training and evaluation: 16-bit scaled, transparency over white, EXIF rotation, CMYK) as
BGR and fed to Detectron2's `DefaultPredictor` (which resizes with INPUT.MIN_SIZE_TEST /
MAX_SIZE_TEST and converts to INPUT.FORMAT). Class names come from the metadata of the
config's first test dataset (`DATASETS.TEST[0]`); its class count must match the model's.

Shown detections: those scoring at least `--confidence-threshold` (default 0.5); an image with
none of them shows its `--top-k` best detections instead (default 3, at least `--min-score`),
so a weakly trained model still shows what it finds (the log says which images fell back).
With `--output`, one visualised image per input (same file name) and `predictions.json` (per
input: the shown detections' class names, scores, XYXY boxes in input-image pixels) are
written there; without it, only a per-image summary is printed.

An input that cannot be read (corrupt, not an image) does not stop the run: the others are
processed, `predictions.json` is written for them, and the unreadable ones are listed at the
end with a non-zero exit status.
"""
import argparse
import glob
import json
import logging
import os
import sys
import time

from projects.tools_common import ToolError, add_config_args, check_dataset_classes, setup_cfg

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
                        help="minimum score of shown detections (default 0.5)")
    parser.add_argument("--top-k", type=int, default=3, metavar="K",
                        help="an image without detections above the threshold shows its K "
                             "best ones instead (default 3; 0: show only those above it)")
    parser.add_argument("--min-score", type=float, default=0.05,
                        help="lowest score a --top-k detection may have; the model runs with "
                             "its SCORE_THRESH_TEST keys at min(this, --confidence-threshold) "
                             "(default 0.05)")
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


def set_confidence_threshold(cfg, threshold, option="--confidence-threshold"):
    """Set every score-threshold key of SCORE_THRESH_KEYS that `cfg` has (cfg unfrozen)."""
    if not 0.0 <= threshold <= 1.0:
        raise ToolError(f"{option} must be in [0, 1], got {threshold}")
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
    """`projects.data.read_image(path, "BGR")`; an unreadable file is a `ToolError` naming it."""
    from projects.data import ImageReadError, read_image

    try:
        return read_image(path, format="BGR")
    except ImageReadError as e:
        raise ToolError(str(e)) from e


def select_shown(instances, threshold, top_k):
    """The detections to show: scores >= `threshold`, or if there are none, the `top_k` best.

    Returns:
        (Instances, fell_back: bool)
    """
    if not instances.has("scores") or len(instances) == 0:
        return instances, False
    keep = instances.scores >= threshold
    if bool(keep.any()) or top_k <= 0:
        return instances[keep], False
    order = instances.scores.argsort(descending=True)[:top_k]
    return instances[order], True


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


def run(cfg, files, output="", threshold=0.0, top_k=0):
    """Predict on `files` with `cfg` and write visualisations to `output` (if set).

    Detections shown (and saved): see `select_shown`. Unreadable inputs are skipped.

    Returns:
        (results, failures): results maps file path -> list of prediction records (see
        `instances_to_records`) for every image processed; failures maps each unreadable
        input to its error message.
    """
    from detectron2.data import MetadataCatalog
    from detectron2.engine import DefaultPredictor
    from detectron2.utils.visualizer import ColorMode, Visualizer

    if len(cfg.DATASETS.TEST):
        check_dataset_classes(cfg, cfg.DATASETS.TEST[:1])  # class names must match the model
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
    results, failures, used_names = {}, {}, set()
    try:
        for path in files:
            try:
                image = read_bgr(path)
            except ToolError as e:
                failures[path] = str(e)
                logger.error("skipping: %s", e)
                continue
            start = time.perf_counter()
            predictions = predictor(image)
            elapsed = time.perf_counter() - start
            instances = predictions["instances"].to("cpu") if "instances" in predictions else None
            fell_back = False
            if instances is not None:
                instances, fell_back = select_shown(instances, threshold, top_k)
            records = instances_to_records(instances, class_names) if instances is not None else []
            results[path] = records
            logger.info("%s: %d instances in %.2fs%s", path, len(records), elapsed,
                        f" (none scored >= {threshold:g}: showing the {len(records)} best)"
                        if fell_back else "")
            if output:
                visualizer = Visualizer(image[:, :, ::-1], metadata,
                                        instance_mode=ColorMode.IMAGE)
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
    finally:  # whatever stops the loop, save the predictions of the images processed
        if output:
            with open(os.path.join(output, "predictions.json"), "w") as f:
                json.dump(results, f, indent=1)
    return results, failures


def main(argv=None):
    """Run the demo; returns ``{input path: records}``. Raises `ToolError` (after writing
    predictions.json for the others) when some inputs could not be read."""
    args = get_parser().parse_args(argv)
    from detectron2.utils.logger import setup_logger

    setup_logger(name="tools.demo", abbrev_name="demo")
    setup_logger(name="projects", abbrev_name="projects")
    if args.top_k < 0:
        raise ToolError(f"--top-k must be >= 0, got {args.top_k}")
    cfg = setup_cfg(args.config_file, args.opts, freeze=False, datasets=args.dataset)
    set_confidence_threshold(cfg, args.confidence_threshold)  # validates it
    set_confidence_threshold(cfg, args.min_score, "--min-score")
    run_threshold = min(args.confidence_threshold, args.min_score) if args.top_k else \
        args.confidence_threshold
    keys = set_confidence_threshold(cfg, run_threshold)
    logger.info("model score threshold %.3f (%s); shown: score >= %.3f, else the %d best",
                run_threshold, ", ".join(keys), args.confidence_threshold, args.top_k)
    cfg.freeze()
    files = collect_inputs(args.input, args.max_images)
    results, failures = run(cfg, files, args.output, args.confidence_threshold, args.top_k)
    n = sum(len(v) for v in results.values())
    print(f"{len(results)} images, {n} instances"
          + (f"; visualisations and predictions.json in {args.output}" if args.output else ""))
    if failures:
        raise ToolError(f"{len(failures)} of {len(files)} inputs could not be read:\n  "
                        + "\n  ".join(failures.values()))
    return results


if __name__ == "__main__":
    try:
        main()
    except ToolError as e:
        sys.exit(f"error: {e}")
