#!/usr/bin/env python
"""Draw the ground truth of a config's training datasets, to check annotations and augmentation.

Examples:
    python tools/visualize_data.py --source annotation --output-dir out/gt --num 20 \\
        --config-file configs/quickstart/mask_rcnn_R_18_FPN_shapes.yaml
    python tools/visualize_data.py --config-file X.yaml --source dataloader --output-dir out/aug

`--source annotation` draws the raw dataset dicts of cfg.DATASETS.TRAIN (original images, all
annotations, including crowd ones). `--source dataloader` draws what the model is trained on:
images and `gt_boxes`/`gt_masks`/`gt_classes` produced by the training data loader of
`projects.engine.Trainer` (resizing, flipping and any method-specific mapping), converted back
from INPUT.FORMAT to RGB. Both stop after `--num` images (Detectron2's own tool never ends in
dataloader mode). Class names come from the metadata of cfg.DATASETS.TRAIN[0] (for a COCO json,
its categories). A user's COCO-format dataset: `--dataset NAME=ann.json:images --opts
DATASETS.TRAIN "('NAME',)"`; the dataloader source also checks the config's class count.
"""
import argparse
import itertools
import logging
import os
import sys

from projects.data import dataset_classes
from projects.tools_common import ToolError, add_config_args, get_trainer_class, setup_cfg

logger = logging.getLogger("tools.visualize_data")


def get_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    parser.add_argument("--source", choices=["annotation", "dataloader"], required=True,
                        help="raw annotations or the output of the training data loader")
    parser.add_argument("--output-dir", required=True, metavar="DIR",
                        help="folder for the visualised images")
    parser.add_argument("--num", type=int, default=16, metavar="N",
                        help="number of images to write (default 16)")
    return add_config_args(parser)


def _output_name(index, file_name):
    stem, _ = os.path.splitext(os.path.basename(file_name or "image"))
    return f"{index:04d}_{stem}.png"


def iter_annotation_images(cfg, metadata):
    """Yield (file name, visualised RGB image) for the raw dicts of cfg.DATASETS.TRAIN."""
    from detectron2.data import DatasetCatalog
    from detectron2.utils.visualizer import Visualizer

    from projects.data import read_image

    for dataset_dict in itertools.chain.from_iterable(
        DatasetCatalog.get(name) for name in cfg.DATASETS.TRAIN
    ):
        image = read_image(dataset_dict["file_name"], format="RGB")
        vis = Visualizer(image, metadata).draw_dataset_dict(dataset_dict)
        yield dataset_dict["file_name"], vis.get_image()


def draw_training_sample(sample, metadata, input_format):
    """Draw one mapped training sample (dict with "image" CHW tensor in `input_format` and
    "instances" with gt_boxes (XYXY, absolute pixels of the resized image), gt_classes and
    optionally gt_masks / gt_keypoints). Returns an HWC uint8 RGB image."""
    from detectron2.data.detection_utils import convert_image_to_rgb
    from detectron2.utils.visualizer import Visualizer

    image = convert_image_to_rgb(sample["image"].permute(1, 2, 0).cpu(), input_format)
    visualizer = Visualizer(image, metadata)
    instances = sample.get("instances", None)
    if instances is None or len(instances) == 0:
        return visualizer.output.get_image()
    names = metadata.get("thing_classes", None)
    classes = instances.gt_classes.tolist() if instances.has("gt_classes") else None
    labels = None
    if classes:
        labels = [names[c] if names and c < len(names) else str(c) for c in classes]
    masks = None
    if instances.has("gt_masks"):
        gt_masks = instances.gt_masks
        masks = gt_masks.polygons if hasattr(gt_masks, "polygons") else gt_masks.tensor.numpy()
    vis = visualizer.overlay_instances(
        labels=labels,
        boxes=instances.gt_boxes if instances.has("gt_boxes") else None,
        masks=masks,
        keypoints=instances.gt_keypoints if instances.has("gt_keypoints") else None,
    )
    return vis.get_image()


def iter_dataloader_images(cfg, metadata):
    """Yield (file name, visualised RGB image) for the samples of the training data loader."""
    loader = get_trainer_class().build_train_loader(cfg)
    for batch in loader:
        for sample in batch:
            yield sample.get("file_name", ""), draw_training_sample(sample, metadata,
                                                                    cfg.INPUT.FORMAT)


def run(cfg, source, output_dir, num):
    """Write `num` visualised images to `output_dir`; returns the written paths."""
    import cv2
    from detectron2.data import MetadataCatalog

    if num <= 0:
        raise ToolError(f"--num must be positive, got {num}")
    if not len(cfg.DATASETS.TRAIN):
        raise ToolError("the config has no training dataset (DATASETS.TRAIN is empty)")
    for name in cfg.DATASETS.TRAIN:  # fills thing_classes from a COCO json if not yet loaded
        try:
            dataset_classes(name)
        except (KeyError, ValueError, FileNotFoundError) as e:
            raise ToolError(e.args[0] if e.args else str(e)) from e
    metadata = MetadataCatalog.get(cfg.DATASETS.TRAIN[0])
    images = (iter_annotation_images if source == "annotation" else iter_dataloader_images)(
        cfg, metadata)
    os.makedirs(output_dir, exist_ok=True)
    written = []
    for index, (file_name, image) in enumerate(itertools.islice(images, num)):
        path = os.path.join(output_dir, _output_name(index, file_name))
        if not cv2.imwrite(path, image[:, :, ::-1]):
            raise ToolError(f"could not write {path}")
        written.append(path)
    logger.info("wrote %d images to %s", len(written), output_dir)
    return written


def main(argv=None):
    args = get_parser().parse_args(argv)
    from detectron2.utils.logger import setup_logger

    setup_logger(name="tools.visualize_data", abbrev_name="vis")
    cfg = setup_cfg(args.config_file, args.opts, datasets=args.dataset)
    written = run(cfg, args.source, args.output_dir, args.num)
    print(f"wrote {len(written)} images to {args.output_dir}")
    return written


if __name__ == "__main__":
    try:
        main()
    except ToolError as e:
        sys.exit(f"error: {e}")
