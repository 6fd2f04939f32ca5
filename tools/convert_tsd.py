#!/usr/bin/env python
"""Convert an authors' TSD checkpoint (Sense-X/TSD, mmdetection v1) to this project's
Detectron2 layout.

Example:
    python tools/convert_tsd.py --config-file configs/tsd/tsd_faster_rcnn_R_50_FPN_1x.yaml \\
        faster_rcnn_r50_fpn_TSD_1x.pth tsd_faster_rcnn_R_50_FPN_1x_converted.pth

The model of --config-file is built (on CPU, no weights) so that every key and shape is
checked; unknown source keys are an error that names them. The logic lives in `tsd.convert`;
see tsd/README.md (set MODEL.TSD.LEGACY_COORDS True and MODEL.ROI_BOX_HEAD.POOLER_TYPE ROIAlign
to evaluate converted weights closest to the original code).
"""
import argparse
import sys

from projects.tools_common import model_state_shapes
from projects_common.checkpoint import ConversionError
from tsd.convert import convert_tsd_checkpoint


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("src", help="authors' checkpoint (.pth, mmcv format)")
    parser.add_argument("dst", help="output file for MODEL.WEIGHTS")
    parser.add_argument("--config-file", required=True,
                        help="the matching configs/tsd/*.yaml (checks every key and shape)")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                        help="config overrides, KEY VALUE pairs")
    args = parser.parse_args(argv)
    shapes = model_state_shapes(args.config_file, args.opts)
    try:
        out = convert_tsd_checkpoint(args.src, args.dst, shapes)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.src}: {len(out)} tensors converted (num_batches_tracked dropped)")
    print(f"wrote {args.dst}; use MODEL.WEIGHTS {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
