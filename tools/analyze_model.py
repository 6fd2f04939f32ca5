#!/usr/bin/env python
"""FLOPs, activations, parameters and structure of any method's model (fvcore counters).

Examples:
    # whole detector, averaged over 10 images of cfg.DATASETS.TEST[0] (after test-time resize)
    python tools/analyze_model.py --config-file X.yaml --tasks flop parameter --num-inputs 10
    # whole detector on one synthetic 800x1333 image (no dataset needed; fed as-is, no resize)
    python tools/analyze_model.py --config-file X.yaml --tasks flop --input-size 800 1333
    # classification trunk only (cfg.MODEL.BACKBONE, its `.bottom_up` for FPN backbones) on one
    # 3x224x224 input, comparable with papers' ImageNet FLOPs/params
    python tools/analyze_model.py --config-file X.yaml --backbone-only --input-size 224 224

FLOPs are fvcore's: one fused multiply-add counts as ONE flop (the "FLOPs" of the ResNet /
Res2Net papers); element-wise ops, BatchNorm, pooling and NMS are not counted
(detectron2.utils.analysis). Box/mask-head FLOPs depend on the number of proposals and
detections, hence the average over `--num-inputs` images. MODEL.WEIGHTS is loaded when it
can be; otherwise (e.g. an ImageNet file that is not here) a warning is logged and the random
initialisation is analysed. Parameter totals count frozen-BatchNorm affine weights as
parameters (papers do); `parameter` also prints fvcore's per-module table.
"""
import argparse
import json
import logging
import sys
from collections import Counter

import numpy as np
import torch

from projects.tools_common import (
    ToolError,
    add_config_args,
    build_model,
    count_parameters,
    get_trainer_class,
    setup_cfg,
    try_load_weights,
)

logger = logging.getLogger("tools.analyze_model")

TASKS = ("flop", "activation", "parameter", "structure")

# Ops not counted (element-wise, reductions, BatchNorm, pooling, NMS): the set
# detectron2.utils.analysis ignores (see `_ignore_ops`).
IGNORED_OPS = (
    "aten::add", "aten::add_", "aten::argmax", "aten::argsort", "aten::batch_norm",
    "aten::constant_pad_nd", "aten::div", "aten::div_", "aten::exp", "aten::log2",
    "aten::max_pool2d", "aten::meshgrid", "aten::mul", "aten::mul_", "aten::neg",
    "aten::nonzero_numpy", "aten::reciprocal", "aten::rsub", "aten::sigmoid", "aten::sigmoid_",
    "aten::softmax", "aten::sort", "aten::sqrt", "aten::sub", "torchvision::nms",
)


def _no_count(inputs, outputs):
    return Counter()


def _ignore_ops(analysis):
    """Make fvcore count nothing for IGNORED_OPS. A zero handle rather than
    `set_op_handle(op=None)`: fvcore keeps counting an op that has a default handle even when
    it is set to None (so detectron2.utils.analysis counts aten::batch_norm)."""
    analysis.set_op_handle(**{k: _no_count for k in IGNORED_OPS})
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return analysis


def flop_analysis(model, inputs):
    """detectron2.utils.analysis.FlopCountAnalysis of `model` on `inputs` (tensor or Detectron2
    batch), ignoring IGNORED_OPS."""
    from detectron2.utils import analysis

    return _ignore_ops(analysis.FlopCountAnalysis(model, inputs))


def activation_counts(model, batch):
    """Activation counts (millions) per operator of `model` on a Detectron2 batch
    (detectron2.utils.analysis.activation_count_operators)."""
    from detectron2.utils import analysis

    return dict(analysis.activation_count_operators(model, batch))


def get_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=["flop", "parameter"],
                        help="what to report (default: flop parameter)")
    parser.add_argument("--num-inputs", type=int, default=10, metavar="N",
                        help="number of test images to average FLOPs/activations over")
    parser.add_argument("--input-size", nargs=2, type=int, default=None, metavar=("H", "W"),
                        help="use one synthetic HxW image instead of test images "
                             "(required with --backbone-only)")
    parser.add_argument("--backbone-only", action="store_true",
                        help="analyse only the bottom-up trunk of cfg.MODEL.BACKBONE "
                             "(flop and parameter tasks) on one 3xHxW input")
    parser.add_argument("--json", default="", metavar="FILE", help="also write results as JSON")
    return add_config_args(parser)


def get_trunk(cfg):
    """The classification trunk of cfg.MODEL.BACKBONE: `backbone.bottom_up` for FPN-style
    backbones, the backbone itself otherwise. Returned in eval mode."""
    from detectron2.layers import ShapeSpec
    from detectron2.modeling import build_backbone

    backbone = build_backbone(cfg, ShapeSpec(channels=len(cfg.MODEL.PIXEL_MEAN)))
    trunk = getattr(backbone, "bottom_up", backbone)
    return trunk.eval()


def analyze_backbone(cfg, input_size):
    """FLOPs and parameters of the trunk on one (1, 3, H, W) input.

    Returns:
        dict with "gflops", "params", "out_channels" (of the last output feature) and
        "gflops_with_fc", "params_with_fc" (adding a 1000-way ImageNet fc classifier).
    """
    trunk = get_trunk(cfg)
    h, w = input_size
    x = torch.zeros(1, len(cfg.MODEL.PIXEL_MEAN), h, w)
    with torch.no_grad():
        total = flop_analysis(trunk, x).total()
    params = count_parameters(trunk)
    shapes = trunk.output_shape()
    last = max(shapes, key=lambda k: shapes[k].stride)
    c = shapes[last].channels
    fc_flops, fc_params = c * 1000, c * 1000 + 1000
    return {
        "mode": "backbone-only",
        "backbone": cfg.MODEL.BACKBONE.NAME,
        "trunk": type(trunk).__name__,
        "input_size": [h, w],
        "gflops": total / 1e9,
        "params": params,
        "last_feature": last,
        "out_channels": c,
        "gflops_with_fc": (total + fc_flops) / 1e9,
        "params_with_fc": params + fc_params,
    }


def build_inputs(cfg, num_inputs, input_size):
    """Model inputs (list of single-image lists): a synthetic HxW image, or the first
    `num_inputs` mapped images of cfg.DATASETS.TEST[0]."""
    if input_size is not None:
        h, w = input_size
        g = torch.Generator().manual_seed(0)
        image = torch.randint(0, 256, (len(cfg.MODEL.PIXEL_MEAN), h, w), generator=g,
                              dtype=torch.uint8)
        return [[{"image": image, "height": h, "width": w}]]
    if not len(cfg.DATASETS.TEST):
        raise ToolError("DATASETS.TEST is empty: pass --input-size H W or a test dataset")
    if num_inputs <= 0:
        raise ToolError(f"--num-inputs must be positive, got {num_inputs}")
    name = cfg.DATASETS.TEST[0]
    try:
        loader = get_trainer_class().build_test_loader(cfg, name)
        inputs = []
        for batch in loader:
            inputs.append(batch)
            if len(inputs) >= num_inputs:
                break
    except (OSError, KeyError) as e:  # dataset files missing / dataset not registered
        raise ToolError(
            f"cannot load test dataset {name!r} ({type(e).__name__}: {e}); pass --input-size "
            "H W for a synthetic image, or another dataset, e.g. "
            "--opts DATASETS.TEST \"('shapes_val',)\"") from e
    return inputs


def analyze_flops(model, inputs):
    """Average total GFLOPs and per-operator GFLOPs over `inputs`; table of the first."""
    from fvcore.nn import flop_count_table

    totals, by_op, table = [], {}, ""
    for i, batch in enumerate(inputs):
        flops = flop_analysis(model, batch)
        totals.append(flops.total() / 1e9)
        for op, v in flops.by_operator().items():
            by_op[op] = by_op.get(op, 0.0) + v / 1e9 / len(inputs)
        if i == 0:
            table = flop_count_table(flops, max_depth=4)
    return {"gflops": float(np.mean(totals)), "gflops_std": float(np.std(totals)),
            "gflops_by_operator": by_op, "num_inputs": len(inputs)}, table


def analyze_activations(model, inputs):
    """Average activation count (millions) per operator and in total over `inputs`."""
    totals, by_op = [], {}
    for batch in inputs:
        counts = activation_counts(model, batch)
        totals.append(sum(counts.values()))
        for op, v in counts.items():
            by_op[op] = by_op.get(op, 0.0) + v / len(inputs)
    return {"mactivations": float(np.mean(totals)), "mactivations_std": float(np.std(totals)),
            "mactivations_by_operator": by_op}


def run(cfg, tasks, num_inputs=10, input_size=None, backbone_only=False):
    """Compute the requested analyses; prints human-readable results, returns a dict."""
    results = {"tasks": list(tasks)}
    if backbone_only:
        if input_size is None:
            raise ToolError("--backbone-only needs --input-size H W (e.g. 224 224)")
        bad = [t for t in tasks if t not in ("flop", "parameter")]
        if bad:
            raise ToolError(f"--backbone-only supports the flop and parameter tasks, not {bad}")
        r = analyze_backbone(cfg, input_size)
        h, w = input_size
        print(f"backbone-only: {r['backbone']} -> trunk {r['trunk']}, input 1x3x{h}x{w}, "
              f"last feature {r['last_feature']} ({r['out_channels']} channels)")
        if "flop" in tasks:
            print(f"FLOPs: {r['gflops']:.3f} GFLOPs (fvcore: 1 fused multiply-add = 1 flop)")
        if "parameter" in tasks:
            print(f"parameters: {r['params'] / 1e6:.3f} M ({r['params']:,})")
        print(f"with a 1000-class fc classifier: {r['gflops_with_fc']:.3f} GFLOPs, "
              f"{r['params_with_fc'] / 1e6:.3f} M parameters")
        results.update(r)
        return results

    inputs = None
    if "flop" in tasks or "activation" in tasks:  # inputs first: fail fast without a dataset
        inputs = build_inputs(cfg, num_inputs, input_size)
    model = build_model(cfg)
    try_load_weights(model, cfg.MODEL.WEIGHTS)
    model.eval()
    if inputs is not None:
        src = (f"synthetic {input_size[0]}x{input_size[1]} image" if input_size
               else f"{len(inputs)} images of {cfg.DATASETS.TEST[0]}")
        with torch.no_grad():
            if "flop" in tasks:
                r, table = analyze_flops(model, inputs)
                print("FLOPs per module (first input):\n" + table)
                print(f"FLOPs: {r['gflops']:.3f} ± {r['gflops_std']:.3f} GFLOPs "
                      f"(mean over {src}; fvcore: 1 fused multiply-add = 1 flop)")
                results.update(r)
            if "activation" in tasks:
                r = analyze_activations(model, inputs)
                per_op = r["mactivations_by_operator"]
                print("activations per operator (M): "
                      + ", ".join(f"{k}: {v:.2f}" for k, v in per_op.items()))
                print(f"activations: {r['mactivations']:.3f} ± {r['mactivations_std']:.3f} M "
                      f"(mean over {src})")
                results.update(r)
    if "parameter" in tasks:
        from fvcore.nn import parameter_count_table  # = detectron2.utils.analysis's

        print("parameters per module:\n" + parameter_count_table(model, max_depth=5))
        n = count_parameters(model)
        print(f"parameters: {n / 1e6:.3f} M ({n:,})")
        results["params"] = n
    if "structure" in tasks:
        print("model structure:\n" + str(model))
        results["structure"] = str(model)
    return results


def main(argv=None):
    args = get_parser().parse_args(argv)
    from detectron2.utils.logger import setup_logger

    setup_logger(name="tools.analyze_model", abbrev_name="analyze")
    setup_logger(name="fvcore")
    cfg = setup_cfg(args.config_file, args.opts, datasets=args.dataset)
    results = run(cfg, args.tasks, args.num_inputs, args.input_size, args.backbone_only)
    results["config_file"] = args.config_file
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    try:
        main()
    except ToolError as e:
        sys.exit(f"error: {e}")
