#!/usr/bin/env python
"""Mixed precision on a GPU, per method family: train a tiny model in fp32, then check that
(1) one training iteration with ``SOLVER.AMP.ENABLED True`` (Detectron2's AMPTrainer) gives
finite losses, and (2) inference under fp16 autocast gives the fp32 detections.

    python tools/amp_check.py --iters 200 --json output/amp.json [--families tsd_cascade rdsnet]

The tiny models are the test suite's (ResNet-18 / small Res2Net, GroupNorm, 96-192 px images on
the built-in `shapes` dataset). Detections are compared on ``--images`` images of shapes_val:
every fp32 detection scoring at least ``--score`` must have an fp16 detection of the same class
with box IoU >= 0.9 (and mask IoU >= 0.8 where the model predicts masks); the largest score
difference of matched pairs is reported. The exit status is non-zero when a family fails.
"""
import argparse
import json
import os
import sys
import time

import torch

# (config under configs/, overrides on top of projects.testing's tiny ResNet/R-CNN options)
_TSD = ["MODEL.TSD.FC_DIM", 256, "MODEL.TSD.OFFSET_FC_DIM", 64, "MODEL.TSD.SAMPLES_PER_BIN", 2,
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 64, "MODEL.RPN.BOUNDARY_THRESH", -1]
FAMILIES = {
    "mask_rcnn": ("quickstart/mask_rcnn_R_18_FPN_shapes.yaml", []),
    "res2net": ("res2net/mask_rcnn_R2_50_26w4s_FPN_2x.yaml", [
        "MODEL.RES2NET.VARIANT", "v1b", "MODEL.RES2NET.NORM", "GN",
        "MODEL.RES2NET.GN_NUM_GROUPS", 8, "MODEL.RES2NET.FREEZE_AT", 0,
        "MODEL.RES2NET.BASE_WIDTH", 8, "MODEL.RES2NET.STEM_OUT_CHANNELS", 32,
        "MODEL.RES2NET.RES2_OUT_CHANNELS", 64, "MODEL.RES2NET.ZERO_INIT_RESIDUAL", True]),
    "dynamic_rcnn": ("dynamic_rcnn/dynamic_rcnn_R_50_FPN_1x.yaml", [
        "MODEL.DYNAMIC_RCNN.UPDATE_ITERS", 20]),
    "tsd_faster": ("tsd/tsd_faster_rcnn_R_50_FPN_1x.yaml", _TSD),
    "tsd_mask": ("tsd/tsd_mask_rcnn_R_50_FPN_1x.yaml", _TSD),
    "tsd_cascade": ("tsd/tsd_cascade_rcnn_R_50_FPN_20e.yaml", _TSD),
    "decoupled_rcnn": ("decoupled_rcnn/decoupled_rcnn_R_50_FPN_2x.yaml", [
        "MODEL.DECOUPLED_RCNN.REG_BATCH_SIZE_PER_IMAGE", 128,
        "MODEL.DECOUPLED_RCNN.RPN_POST_NMS_TOPK_REG_TRAIN", 300]),
    "rdsnet": ("rdsnet/rdsnet_R_50_FPN_1x.yaml", [
        "MODEL.RDSNET.NUM_CLASSES", 3, "MODEL.RDSNET.PIXEL_CONV_DIM", 64,
        "MODEL.ANCHOR_GENERATOR.SIZES", [[16, 20.16, 25.4], [32, 40.3, 50.8], [64, 80.6, 101.6],
                                         [128, 161.3, 203.2], [256, 322.5, 406.4]]]),
    "rdsnet_mbrm": ("rdsnet/rdsnet_refine_R_50_FPN_1x.yaml", [
        "MODEL.RDSNET.NUM_CLASSES", 3, "MODEL.RDSNET.PIXEL_CONV_DIM", 64,
        "MODEL.ANCHOR_GENERATOR.SIZES", [[16, 20.16, 25.4], [32, 40.3, 50.8], [64, 80.6, 101.6],
                                         [128, 161.3, 203.2], [256, 322.5, 406.4]]]),
}


def tiny_cfg(family, iters, output_dir, device="cuda"):
    from projects.testing import TINY_RCNN_OPTS, TINY_RESNET_OPTS, load_config, repo_root

    config, extra = FAMILIES[family]
    base = TINY_RESNET_OPTS + ([] if family.startswith("rdsnet") else TINY_RCNN_OPTS)
    cfg = load_config(os.path.join(repo_root(), "configs", config), base + extra + [
        "MODEL.DEVICE", device, "SOLVER.MAX_ITER", iters, "SOLVER.STEPS", (int(iters * 0.8),),
        "SEED", 1, "OUTPUT_DIR", output_dir])
    return cfg


def train_args(family, device="cuda"):
    """`train_net.py` arguments for `family`'s tiny config, shell-quoted."""
    import shlex

    from projects.testing import TINY_RCNN_OPTS, TINY_RESNET_OPTS, repo_root

    config, extra = FAMILIES[family]
    base = TINY_RESNET_OPTS + ([] if family.startswith("rdsnet") else TINY_RCNN_OPTS)
    opts = base + extra + ["MODEL.DEVICE", device, "SEED", 1]
    words = ["--config-file", os.path.join(repo_root(), "configs", config)]
    words += [str(v) for v in opts]
    return " ".join(shlex.quote(w) for w in words)


def _box_iou(a, b):
    from detectron2.structures import Boxes, pairwise_iou

    return pairwise_iou(Boxes(a), Boxes(b))


def compare_detections(ref, test, score):
    """Match each ``ref`` detection scoring >= ``score`` to a ``test`` detection of the same
    class (box IoU >= 0.9; mask IoU >= 0.8 if masks). Returns (n_ref, n_matched, max score
    difference of matched pairs)."""
    keep = ref.scores >= score
    ref = ref[keep]
    if len(ref) == 0:
        return 0, 0, 0.0
    if len(test) == 0:
        return len(ref), 0, 0.0
    iou = _box_iou(ref.pred_boxes.tensor.float(), test.pred_boxes.tensor.float())
    iou[ref.pred_classes[:, None] != test.pred_classes[None, :]] = 0
    matched, worst = 0, 0.0
    for i in range(len(ref)):
        j = int(iou[i].argmax())
        if iou[i, j] < 0.9:
            continue
        if ref.has("pred_masks"):
            m1, m2 = ref.pred_masks[i].bool(), test.pred_masks[j].bool()
            inter, union = (m1 & m2).sum().item(), (m1 | m2).sum().item()
            if union and inter / union < 0.8:
                continue
        matched += 1
        worst = max(worst, abs(float(ref.scores[i]) - float(test.scores[j])))
    return len(ref), matched, worst


def check_family(family, iters, images, score, out_dir, device="cuda"):
    from detectron2.data import DatasetCatalog
    from detectron2.data.detection_utils import read_image
    from detectron2.utils.env import seed_all_rng

    from projects.engine import Trainer

    start = time.perf_counter()
    cfg = tiny_cfg(family, iters, os.path.join(out_dir, family), device)
    autocast_type = torch.float16 if device == "cuda" else torch.bfloat16
    cfg.freeze()
    seed_all_rng(1)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    model = trainer.model
    result = {"family": family, "train_s": round(time.perf_counter() - start, 1)}

    # (1) one AMP training iteration from the trained weights (AMPTrainer needs CUDA)
    if device == "cuda":
        result.update(amp_training_iteration(cfg, model, iters))

    # (2) fp16-autocast inference against fp32 on shapes_val images
    model.eval()
    dicts = DatasetCatalog.get(cfg.DATASETS.TEST[0])[:images]
    from detectron2.data import transforms as T

    aug = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    n_ref = n_matched = 0
    worst = 0.0
    for d in dicts:
        img = read_image(d["file_name"], format=cfg.INPUT.FORMAT)
        h, w = img.shape[:2]
        tensor = torch.as_tensor(aug.get_transform(img).apply_image(img).astype("float32")
                                 .transpose(2, 0, 1))
        inputs = [{"image": tensor, "height": h, "width": w}]
        with torch.no_grad():
            ref = model(inputs)[0]["instances"]
            with torch.autocast(device, dtype=autocast_type):
                test = model(inputs)[0]["instances"]
        a, b, c = compare_detections(ref.to("cpu"), test.to("cpu"), score)
        n_ref, n_matched, worst = n_ref + a, n_matched + b, max(worst, c)
    result.update(fp32_detections=n_ref, autocast_matched=n_matched,
                  max_score_diff=round(worst, 4))
    result["ok"] = bool(result.get("amp_finite", device != "cuda") and n_ref > 0
                        and n_matched >= 0.95 * n_ref and worst < 0.05)
    result["total_s"] = round(time.perf_counter() - start, 1)
    return result


def amp_training_iteration(cfg, model, iters):
    """One training iteration of `cfg` with SOLVER.AMP.ENABLED from `model`'s weights."""
    from projects.engine import Trainer

    result = {}
    amp_cfg = cfg.clone()
    amp_cfg.defrost()
    amp_cfg.SOLVER.AMP.ENABLED = True
    amp_cfg.SOLVER.MAX_ITER = iters + 1
    amp_cfg.freeze()
    amp_trainer = Trainer(amp_cfg)
    amp_trainer.model.load_state_dict(model.state_dict())
    amp_trainer.start_iter = iters
    amp_trainer.train()
    amp_losses = {k: v.latest() for k, v in amp_trainer.storage.histories().items()
                  if "loss" in k}
    result["amp_trainer"] = type(amp_trainer._trainer).__name__
    result["amp_losses"] = {k: float(v) for k, v in amp_losses.items()}
    result["amp_finite"] = all(torch.isfinite(torch.tensor(v)) for v in amp_losses.values())
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--iters", type=int, default=200, help="fp32 training iterations")
    parser.add_argument("--images", type=int, default=8, help="shapes_val images compared")
    parser.add_argument("--score", type=float, default=0.3, help="fp32 detections compared")
    parser.add_argument("--output", default="output/amp_check", help="training output folder")
    parser.add_argument("--json", default="", help="write the results as JSON")
    parser.add_argument("--device", default="cuda",
                        help="cuda (default); cpu only dry-runs the inference comparison with "
                             "bfloat16 autocast (no AMP training iteration)")
    parser.add_argument("--print-train-args", choices=list(FAMILIES), metavar="FAMILY",
                        help="print `train_net.py` arguments (shell-quoted) for FAMILY's tiny "
                             "config on --device, and exit")
    args = parser.parse_args(argv)
    if args.print_train_args:
        print(train_args(args.print_train_args, args.device))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: tools/amp_check.py needs a CUDA GPU (Detectron2's AMPTrainer is CUDA-only)")
    import projects  # noqa: F401  (registers the methods and datasets)

    results = []
    for family in args.families:
        try:
            r = check_family(family, args.iters, args.images, args.score, args.output,
                             args.device)
        except Exception as e:  # noqa: BLE001  (report every family, then fail)
            import traceback

            traceback.print_exc()
            r = {"family": family, "ok": False, "error": f"{type(e).__name__}: {e}"}
        print(json.dumps(r), flush=True)
        results.append(r)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    failed = [r["family"] for r in results if not r["ok"]]
    print(f"amp_check: {len(results) - len(failed)} passed, {len(failed)} failed"
          + (f" ({', '.join(failed)})" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
