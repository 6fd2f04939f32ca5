#!/usr/bin/env python
"""Convert a released Dynamic R-CNN checkpoint to this project's Detectron2 layout.

Sources: the authors' maskrcnn-benchmark-style code (hkzhang95/DynamicRCNN, "orig"),
MMDetection 2.x / 3.x ("mmdet") and the authors' MMDetection v1.1 port ("mmdet_v1");
detected from the key names unless --source is given. Every upstream key is mapped or
explicitly dropped; the classifier / regressor rows are reordered to Detectron2's layout.

Example:
    python tools/convert_dynamic_rcnn.py dynamic_rcnn_r50_fpn_1x.pth \
        dynamic_rcnn_R_50_FPN_1x_d2.pth \
        --config-file configs/dynamic_rcnn/dynamic_rcnn_R_50_FPN_1x.yaml
    # then MODEL.WEIGHTS dynamic_rcnn_R_50_FPN_1x_d2.pth (and, for "orig" weights, the input
    # settings listed in dynamic_rcnn/README.md).

The logic lives in `dynamic_rcnn.convert`; see dynamic_rcnn/README.md.
"""
import argparse
import sys

from projects.tools_common import model_state_shapes
from projects_common.checkpoint import ConversionError


def main(argv=None):
    from dynamic_rcnn.convert import SOURCES, convert_checkpoint

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("src", help="upstream checkpoint (.pth)")
    parser.add_argument("dst", help="output file for MODEL.WEIGHTS")
    parser.add_argument("--source", default="auto", choices=("auto",) + SOURCES)
    parser.add_argument("--config-file", default=None,
                        help="check that every tensor of this config's model is filled with "
                             "the right shape (e.g. NUM_CLASSES, DCN offsets)")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                        help="KEY VALUE overrides for --config-file")
    args = parser.parse_args(argv)
    shapes = model_state_shapes(args.config_file, args.opts) if args.config_file else None
    try:
        source, n_conv, n_drop = convert_checkpoint(
            args.src, args.dst, None if args.source == "auto" else args.source, shapes)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.src}: {source} checkpoint, {n_conv} tensors converted, {n_drop} keys dropped "
          f"(BN step counters / anchor buffers)")
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
