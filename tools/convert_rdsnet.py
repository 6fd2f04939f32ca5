#!/usr/bin/env python
"""Convert an authors' RDSNet checkpoint (mmdetection v1, e.g. rdsnet_r50_fpn_1x-124f64c3.pth)
to this project's Detectron2 layout.

Example:
    python tools/convert_rdsnet.py --config-file configs/rdsnet/rdsnet_R_50_FPN_1x.yaml \
        rdsnet_r50_fpn_1x-124f64c3.pth rdsnet_R_50_FPN_1x.pth
    python train_net.py --eval-only --config-file configs/rdsnet/rdsnet_refine_R_50_FPN_1x.yaml \
        MODEL.WEIGHTS rdsnet_R_50_FPN_1x.pth      # same file with and without MBRM

Every upstream key is mapped or explicitly dropped; shapes are checked against the model of
the config (the anchor dimension is permuted when the config uses Detectron2's
DefaultAnchorGenerator). The logic lives in `rdsnet.convert`; see rdsnet/README.md.
"""
import argparse
import sys

from projects_common.checkpoint import ConversionError


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, help="RDSNet YAML of the target model")
    parser.add_argument("src", help="upstream mmdetection-v1 checkpoint (.pth)")
    parser.add_argument("dst", help="output file for MODEL.WEIGHTS (.pth)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)

    import projects  # noqa: F401  (registers every method)
    from projects.config import load_config
    from rdsnet.convert import convert_rdsnet_checkpoint

    cfg = load_config(args.config_file, args.opts)
    try:
        counts = convert_rdsnet_checkpoint(cfg, args.src, args.dst)
    except ConversionError as e:
        print(f"error: {args.src}: {e}", file=sys.stderr)
        return 1
    print(
        f"{args.src}: {counts['source']} tensors, {counts['converted']} converted, "
        f"{counts['source'] - counts['converted']} dropped (num_batches_tracked / mbrm)"
    )
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
