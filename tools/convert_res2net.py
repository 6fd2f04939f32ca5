#!/usr/bin/env python
"""Convert a Res2Net / ResNet checkpoint (official ImageNet = timm, mmdetection,
maskrcnn-benchmark, torchvision ResNet) to the `res2net` package's Detectron2 layout.

Example:
    python tools/convert_res2net.py res2net50_v1b_26w_4s-3cf99910.pth
    # -> res2net50_v1b_26w_4s_d2.pth next to the input; set MODEL.WEIGHTS to it.

The logic lives in `res2net.convert`; see res2net/README.md.
"""
import argparse
import sys

from projects_common.checkpoint import ConversionError
from res2net.convert import LAYOUTS, convert_res2net_checkpoint


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("src", help="upstream checkpoint (.pth)")
    parser.add_argument("dst", nargs="?", default=None,
                        help="output file: .pth/.pt (torch) or .pkl (Detectron2 pickle); default: "
                             "the configs' name, e.g. res2net50_v1b_26w_4s_d2.pth, next to src")
    parser.add_argument("--layout", default="auto", choices=("auto",) + LAYOUTS)
    parser.add_argument("--prefix", default="backbone.bottom_up.",
                        help="key prefix: 'backbone.bottom_up.' for the FPN backbones (default), "
                             "'backbone.' for build_res2net_backbone, '' for a bare trunk")
    parser.add_argument("--keep-fc", action="store_true",
                        help="keep the ImageNet classifier as 'linear.*' instead of dropping it")
    parser.add_argument("--drop-non-backbone", action="store_true",
                        help="drop the neck/head keys of a whole-detector checkpoint")
    dcn = parser.add_mutually_exclusive_group()
    dcn.add_argument("--dcn-v1", dest="deform_modulated", action="store_false", default=None,
                     help="DCN offset convs are DCNv1 (18 channels per deformable group)")
    dcn.add_argument("--dcn-v2", dest="deform_modulated", action="store_true",
                     help="DCN offset convs are DCNv2/modulated (27 channels per group)")
    parser.set_defaults(deform_modulated=None)  # read it from the channel count
    args = parser.parse_args(argv)
    try:
        converted, info, dst = convert_res2net_checkpoint(
            args.src, args.dst, layout=args.layout, prefix=args.prefix, keep_fc=args.keep_fc,
            drop_non_backbone=args.drop_non_backbone, deform_modulated=args.deform_modulated,
        )
    except ConversionError as e:
        print(f"error: {args.src}: {e}", file=sys.stderr)
        return 1
    arch = info["arch"]
    dropped_kinds = ", ".join(sorted({k.split(".")[-1] for k in info["dropped"]}))
    print(f"{args.src}: {info['layout']} layout, {arch['variant']} depth {arch['depth']} "
          f"{arch['base_width']}w x {arch['scale']}s; {info['num_converted']} backbone tensors "
          f"converted, {len(info['dropped'])} dropped ({dropped_kinds or '-'})")
    print(f"wrote {dst}")
    print("config: MODEL.RES2NET.VARIANT {variant} MODEL.RES2NET.DEPTH {depth} "
          "MODEL.RES2NET.BASE_WIDTH {base_width} MODEL.RES2NET.SCALE {scale} "
          "MODEL.WEIGHTS {dst}".format(dst=dst, **arch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
