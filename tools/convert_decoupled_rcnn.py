#!/usr/bin/env python
"""Convert the authors' mmdetection v2.4 Decoupled R-CNN checkpoint (or an ImageNet ResNet /
ResNeXt trunk with --backbone-only) to this project's Detectron2 layout.

Examples:
    python tools/convert_decoupled_rcnn.py \\
        --config-file configs/decoupled_rcnn/decoupled_rcnn_R_50_FPN_2x.yaml \\
        decoupled_refine_rcnn_r50_fpn_2x_coco.pth decoupled_rcnn_R_50_FPN_2x_converted.pth
    python tools/convert_decoupled_rcnn.py --backbone-only \\
        --config-file configs/decoupled_rcnn/decoupled_rcnn_R_50_FPN_2x.yaml \\
        resnet50-19c8e357.pth torchvision-R-50_d2.pth

The model of --config-file is built (on CPU, no weights) to check every key and shape.
The logic lives in `decoupled_rcnn.convert`; see decoupled_rcnn/README.md.
"""
import argparse
import sys

from projects.tools_common import model_state_shapes
from projects_common.checkpoint import ConversionError
from decoupled_rcnn.convert import ROI_HEAD_TENSORS, convert_decoupled_rcnn_checkpoint


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("src", help="mmdetection checkpoint (.pth)")
    parser.add_argument("dst", help="output file for MODEL.WEIGHTS")
    parser.add_argument("--config-file", required=True,
                        help="the matching configs/decoupled_rcnn/*.yaml (checks the shapes)")
    parser.add_argument("--backbone-only", action="store_true",
                        help="src is an ImageNet trunk (conv1/bn1/layer*/fc keys)")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                        help="config overrides, KEY VALUE pairs (e.g. MODEL.ROI_HEADS.NUM_CLASSES)")
    args = parser.parse_args(argv)
    shapes = model_state_shapes(args.config_file, args.opts)
    try:
        info = convert_decoupled_rcnn_checkpoint(args.src, args.dst, shapes, args.backbone_only)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.src}: {info['num_converted']} tensors converted, {info['num_dropped']} dropped "
          f"(num_batches_tracked{', fc' if args.backbone_only else ''}); "
          f"{info['num_roi_head_tensors']} RoI-head tensors"
          + ("" if args.backbone_only else f" (expected {ROI_HEAD_TENSORS})"))
    print(f"wrote {args.dst}; use MODEL.WEIGHTS {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
