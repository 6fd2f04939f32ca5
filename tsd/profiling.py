"""Share of the deformable RoI pooling in a TSD model's iteration (torch.profiler).

    python -m tsd.profiling --config-file configs/tsd/tsd_faster_rcnn_R_50_FPN_1x.yaml \\
        --task eval --size 800 1333 --iters 2 --opts MODEL.DEVICE cpu

Pooling time = CPU time (children included) of the ``tsd/deform_roi_pool`` scope in the forward
(sample points, bilinear weights, weighted embedding-bag) + the embedding-bag backward node
(feature and weight gradients). Total = the profiler's self CPU time summed over all ops, i.e.
the iteration's time on the main thread. On CUDA the same is reported with device time.
"""
import argparse
import time

import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from torch.profiler import ProfilerActivity, profile

from .config import add_tsd_config

POOL_SCOPE = "tsd/deform_roi_pool"
POOL_BACKWARD = "EmbeddingBagBackward"


def synthetic_batch(size, num_images=1, num_boxes=5, seed=0, device="cpu"):
    """Random HxW images with random ground-truth boxes (classes 0..2)."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    batch = []
    for _ in range(num_images):
        inst = Instances((h, w))
        xy = torch.rand(num_boxes, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
        wh = 32 + torch.rand(num_boxes, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3])
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
        inst.gt_classes = torch.randint(0, 3, (num_boxes,), generator=g)
        img = torch.randint(0, 255, (3, h, w), generator=g, dtype=torch.uint8).float()
        batch.append({"image": img.to(device), "instances": inst.to(device), "height": h,
                      "width": w})
    return batch


def pooling_share(model, batch, task="eval", iters=2, table_rows=0):
    """Returns (pooling seconds, total seconds, wall seconds) per iteration; with
    ``table_rows`` > 0 also prints the profiler's top ops by self time."""
    model.train(task == "train")
    cuda = next(model.parameters()).is_cuda
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])

    def step():
        if task == "train":
            with EventStorage():
                sum(model(batch).values()).backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                model(batch)

    step()  # warm-up
    t = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(iters):
            step()
        if cuda:
            torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / iters
    attr = "device_time_total" if cuda else "cpu_time_total"
    self_attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = prof.key_averages()
    pool = sum(getattr(e, attr) for e in events
               if e.key == POOL_SCOPE or (e.key.startswith("autograd::engine::evaluate_function")
                                          and POOL_BACKWARD in e.key))
    total = sum(getattr(e, self_attr) for e in events)
    if table_rows:
        print(events.table(sort_by=self_attr, row_limit=table_rows))
    return pool / 1e6 / iters, total / 1e6 / iters, wall


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--task", choices=["train", "eval"], default="eval")
    parser.add_argument("--size", nargs=2, type=int, default=[800, 1333])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--table", type=int, default=0, help="print the N most expensive ops")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[])
    args = parser.parse_args(argv)
    cfg = get_cfg()
    add_tsd_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(cfg)
    batch = synthetic_batch(args.size, args.batch, device=cfg.MODEL.DEVICE)
    pool, total, wall = pooling_share(model, batch, args.task, args.iters, args.table)
    print(f"{args.task} {args.size[0]}x{args.size[1]} batch {args.batch}: wall {wall:.3f} s/iter, "
          f"profiled total {total:.3f} s, deformable pooling {pool:.3f} s "
          f"({100 * pool / max(total, 1e-12):.1f} %)")


if __name__ == "__main__":
    main()
