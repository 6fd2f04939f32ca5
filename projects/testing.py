"""Helpers for the test suite (tiny CPU models on the built-in `shapes` dataset).

    cfg = load_config("configs/tsd/....yaml", TINY_RESNET_OPTS + TINY_RCNN_OPTS + [...])
    losses = run_one_training_iteration(cfg)
    results = train_and_evaluate(cfg, tmp_path)      # results["bbox"]["AP"]

`TINY_RESNET_OPTS` make any ResNet-FPN config tiny: ResNet-18 trunk and 64-channel FPN with
GroupNorm, trained from scratch (FrozenBN from random weights diverges), 96-128 px images,
batch 4, no loader workers, 300 iterations at lr 0.05. Measured on `shapes_val` with the
quickstart Mask R-CNN: 1.1 bbox AP after 200 iterations with BatchNorm at lr 0.02 (lr 0.05
diverged), 10.0 bbox / 11.6 mask AP after 300 iterations with GroupNorm at lr 0.05.
`TINY_RCNN_OPTS` adds small RPN/ROI settings for two-stage models. `SWEEP_OPTS` only shrink
inputs/batch/dataset for the one-iteration sweep over full-size configs.
"""
import math
import os

import torch
from detectron2.data import build_detection_train_loader
from detectron2.modeling import build_model
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import EventStorage

from .config import load_config
from .data import build_train_mapper
from .engine import Trainer

__all__ = ["timed_stage_probe", "TEST_DEVICE", "TINY_RESNET_OPTS", "TINY_RCNN_OPTS", "SWEEP_OPTS", "load_config",
           "run_one_training_iteration", "train_and_evaluate", "repo_root", "ddp_train_worker"]

# Device of the models the tests build: "cpu" (CI), or "cuda" to run the same tests on a GPU
# (`TEST_DEVICE=cuda make test`; tools/gpu_check.sh does this).
TEST_DEVICE = os.environ.get("TEST_DEVICE", "cpu")

_DATA_OPTS = [
    "MODEL.WEIGHTS", "",
    "MODEL.DEVICE", TEST_DEVICE,
    "DATASETS.TRAIN", ("shapes_train",),
    "DATASETS.TEST", ("shapes_val",),
    "DATALOADER.NUM_WORKERS", 0,
    "TEST.EVAL_PERIOD", 0,
    "SOLVER.CHECKPOINT_PERIOD", 100000,
]

TINY_RESNET_OPTS = _DATA_OPTS + [
    "MODEL.BACKBONE.FREEZE_AT", 0,
    "MODEL.RESNETS.DEPTH", 18,
    "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
    "MODEL.RESNETS.NORM", "GN",
    "MODEL.RESNETS.DEFORM_ON_PER_STAGE", [False, False, False, False],
    "MODEL.RESNETS.NUM_GROUPS", 1,
    "MODEL.RESNETS.WIDTH_PER_GROUP", 64,
    "MODEL.FPN.OUT_CHANNELS", 64,
    "MODEL.FPN.NORM", "GN",
    "INPUT.MIN_SIZE_TRAIN", (96, 112, 128),
    "INPUT.MAX_SIZE_TRAIN", 192,
    "INPUT.MIN_SIZE_TEST", 112,
    "INPUT.MAX_SIZE_TEST", 192,
    "SOLVER.IMS_PER_BATCH", 4,
    "SOLVER.BASE_LR", 0.05,
    "SOLVER.WARMUP_ITERS", 50,
    "SOLVER.MAX_ITER", 300,
    "SOLVER.STEPS", (260,),
    "TEST.DETECTIONS_PER_IMAGE", 50,
]

TINY_RCNN_OPTS = [
    "MODEL.ANCHOR_GENERATOR.SIZES", [[8], [16], [32], [64], [128]],
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", 600,
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", 300,
    "MODEL.RPN.PRE_NMS_TOPK_TEST", 300,
    "MODEL.RPN.POST_NMS_TOPK_TEST", 100,
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE", 128,
    "MODEL.ROI_HEADS.NUM_CLASSES", 3,
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 128,
    "MODEL.ROI_BOX_HEAD.FC_DIM", 256,
    "MODEL.ROI_MASK_HEAD.CONV_DIM", 64,
    "MODEL.ROI_MASK_HEAD.NUM_CONV", 2,
]

SWEEP_OPTS = _DATA_OPTS + [
    "INPUT.MIN_SIZE_TRAIN", (64,),
    "INPUT.MAX_SIZE_TRAIN", 96,
    "INPUT.MIN_SIZE_TRAIN_SAMPLING", "choice",
    "INPUT.CROP.ENABLED", False,
    "SOLVER.IMS_PER_BATCH", 2,
]


def timed_stage_probe(fn, delay: float = 0.3):
    """``fn`` made ``delay`` seconds slower: a benchmark test replaces a post-processing
    function with it and checks that the delay is charged to the post-processing stage."""
    import time

    def slow(*args, **kwargs):
        time.sleep(delay)
        return fn(*args, **kwargs)

    return slow


def repo_root() -> str:
    """The checkout (or installed package parent) holding `configs/` and `tools/`."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_one_training_iteration(cfg):
    """Build ``cfg``'s model, run forward + backward on one ``DATASETS.TRAIN`` batch.

    Returns ``{loss_name: float}``; raises `FloatingPointError` on a non-finite loss.
    """
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    loader = build_detection_train_loader(cfg, mapper=build_train_mapper(cfg))
    batch = next(iter(loader))
    with EventStorage(0):
        losses = model(batch)
        total = sum(losses.values())
        if not torch.isfinite(total):
            raise FloatingPointError(f"non-finite loss: { {k: float(v) for k, v in losses.items()} }")
        total.backward()
    return {k: float(v.detach()) for k, v in losses.items()}


def train_and_evaluate(cfg, output_dir):
    """Train ``cfg`` with the project's `Trainer` in ``output_dir`` and return the COCO results
    of the final evaluation on ``DATASETS.TEST`` (e.g. ``res["bbox"]["AP"]``)."""
    cfg = cfg.clone()
    cfg.OUTPUT_DIR = str(output_dir)
    cfg.freeze()
    seed_all_rng(cfg.SEED if cfg.SEED >= 0 else 0)  # torch, numpy (the sampler's seed), random
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    results = trainer.train()
    for task, metrics in results.items():
        for name, value in metrics.items():
            if isinstance(value, float) and math.isnan(value):
                metrics[name] = 0.0 if name.startswith("AP") else value
    return results


def ddp_train_worker(rank, world_size, port, out_dir, config_file, opts):
    """Process ``rank`` of a CPU (gloo) DDP run of `Trainer` (for ``mp.start_processes``).

    Saves ``{"ddp": wrapped in DDP?, "params": state_dict}`` to ``out_dir/rank<rank>.pt``.
    Each rank starts from a different random init: DDP must broadcast rank 0's weights.
    """
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    try:
        torch.set_num_threads(1)
        cfg = load_config(config_file, list(opts) + ["OUTPUT_DIR", os.path.join(out_dir, str(rank))])
        cfg.freeze()
        torch.manual_seed(rank)
        trainer = Trainer(cfg)
        trainer.train()
        model = trainer.model
        torch.save({"ddp": isinstance(model, torch.nn.parallel.DistributedDataParallel),
                    "params": {k: v.detach().clone() for k, v in model.state_dict().items()}},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
