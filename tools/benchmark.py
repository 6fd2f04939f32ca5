#!/usr/bin/env python
"""Time several configs side by side in one run (training step, inference or data loading).

Examples:
    # inference of two methods on a synthetic 800x1333 image, 20 timed iterations
    python tools/benchmark.py --task eval --size 800 1333 --iters 20 --warmup 3 \\
        --config-file configs/tsd/baseline_faster_rcnn_R_50_FPN_1x.yaml \\
        configs/tsd/tsd_faster_rcnn_R_50_FPN_1x.yaml
    # one config with and without an option (a config SPEC may carry its own overrides)
    python tools/benchmark.py --task eval --size 800 1333 --label plain MBRM \\
        --config-file configs/rdsnet/rdsnet_R_50_FPN_1x.yaml \\
        "configs/rdsnet/rdsnet_R_50_FPN_1x.yaml::MODEL.RDSNET.MBRM.ENABLED True" \\
        --json out/bench.json --opts MODEL.DEVICE cpu

Config SPECs: each `--config-file` value is `PATH` or `PATH::KEY VALUE [KEY VALUE ...]`
(quote a SPEC with overrides so that the shell keeps it one word). The first SPEC is the
reference of the ratio column. Overrides apply in this order: the YAML, the global `--opts`
(every config), then the SPEC's own overrides. `--label` gives one name per SPEC.

Tasks: `train` times one training iteration (forward, backward, optimizer step of
Trainer.build_optimizer) on a fixed synthetic batch of `--batch` HxW images (`--size`), each
with a few random ground-truth boxes, classes and polygon masks (no dataset needed); `eval`
times inference (model.eval(), no_grad) on `--batch` synthetic HxW images fed as-is (no
test-time resize); `data` times one batch of Trainer.build_train_loader on the config's
training datasets (--size/--batch unused; with DATALOADER.NUM_WORKERS > 0 the workers prefetch
while other configs run, so use NUM_WORKERS 0 to time the mapping itself).

MODEL.WEIGHTS is loaded when it can be (trained weights make the number of detections, hence
post-processing time, realistic); otherwise the worker warns and keeps the random
initialisation (JSON field `weights_loaded`).

Equal work: a benchmark compares detectors only when they do the work a trained detector
would. A model whose MODEL.WEIGHTS could not be loaded has its frozen BatchNorm calibrated on
the benchmark input (`projects.benchmarking.calibrate_frozen_batchnorm`; `--no-calibrate`
keeps Detectron2's identity statistics, under which a random ResNet's activations explode and
its RPN keeps a handful of boxes), and a model whose backbone outputs still explode (RMS over
1e3) is refused. Per config the report gives proposals and detections per image, the inference
time split into backbone / proposal generator / heads / post-processing (score threshold, NMS,
top-k, rescaling, mask pasting) and the rest, and with `--flops` the fvcore GFLOPs of one
inference and their ratio beside the time ratio. The time ratio is refused (table printed with
"-", the reasons listed, exit status 2) when an R-CNN's RPN returned fewer proposals than its
POST_NMS_TOPK_TEST, when two R-CNNs with the same top-k got different proposal counts, or when
the models returned different numbers of detections per image; `--allow-unequal-work` prints
it anyway, with the reasons. Random weights give (near) zero detections at the configs' score
thresholds, so post-processing costs are realistic only with trained weights.

Measurement design: every config runs in its own worker process (a fresh interpreter holding
only that config's model), and the parent steps the workers in lock-step round-robin (A, B, A,
B, ...), one at a time, so slow phases of a shared or noisy machine hit every config equally
and configs never compete for cores. `--warmup` round-robin iterations are run first and not
timed. Each worker times its own iteration (with CUDA synchronisation on GPU). Peak memory is
clean per config: on CUDA `torch.cuda.max_memory_allocated` of the worker since the end of
warmup; on CPU the worker's peak resident set size (`resource.getrusage(RUSAGE_SELF).ru_maxrss`)
minus its resident size just before the model was built (model, optimizer state, activations
and allocator caches). Reported per config: median and mean seconds per iteration, the time
ratio to the first config (the median over the rounds of the per-round ratio: rounds are
paired samples, so a slow phase that hits one round cancels out), peak memory (MB) and
parameter count.
"""
import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

SPEC_SEPARATOR = "::"
STAGE_COLUMNS = ("backbone", "proposals", "heads", "postprocess")  # projects.benchmarking.STAGES
MESSAGE_PREFIX = "@@BENCHMARK "  # worker -> parent protocol lines on the worker's stdout


class BenchmarkError(RuntimeError):
    """A user-facing error (bad spec, failed worker)."""


def get_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    parser.add_argument("--config-file", nargs="+", required=True, metavar="SPEC",
                        help="configs to compare: PATH or 'PATH::KEY VALUE ...'; first = reference")
    parser.add_argument("--label", nargs="+", default=None, metavar="NAME",
                        help="one label per config (default: file name + overrides)")
    parser.add_argument("--task", choices=["train", "eval", "data"], default="eval",
                        help="train: training iteration; eval: inference; data: one batch of "
                             "the training data loader (default eval)")
    parser.add_argument("--size", nargs=2, type=int, default=[800, 1333], metavar=("H", "W"),
                        help="synthetic image size for train/eval (default 800 1333)")
    parser.add_argument("--batch", type=int, default=1, help="images per iteration (default 1)")
    parser.add_argument("--iters", type=int, default=10, help="timed iterations per config")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations per config")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch.set_num_threads in each worker (0: torch's default)")
    parser.add_argument("--flops", action="store_true",
                        help="also count each model's inference GFLOPs (fvcore, one traced "
                             "forward on the benchmark input) and print the FLOPs ratio")
    parser.add_argument("--no-calibrate", action="store_true",
                        help="keep frozen BatchNorm of randomly initialised models at identity "
                             "statistics (activations may explode; see projects.benchmarking)")
    parser.add_argument("--allow-unequal-work", action="store_true",
                        help="print time ratios even when the models did different amounts "
                             "of work (proposals / detections per image)")
    parser.add_argument("--json", default="", metavar="FILE", help="also write results as JSON")
    # as projects.tools_common.add_dataset_args, without importing torch in the parent
    parser.add_argument("--dataset", action="append", default=[],
                        metavar="NAME=path/to/annotations.json:path/to/images",
                        help="register a COCO-format dataset in every worker (repeatable), "
                             "e.g. for --task data with DATASETS.TRAIN set to NAME")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER, metavar="KEY VALUE",
                        help="config overrides applied to every config (must come last)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal
    return parser


# ----------------------------------------------------------------------------- parent side


def parse_spec(spec, common_opts=()):
    """`PATH[::KEY VALUE ...]` -> (path, opts), opts = common_opts + the spec's overrides."""
    path, _, rest = spec.partition(SPEC_SEPARATOR)
    own = shlex.split(rest) if rest else []
    if not os.path.isfile(path):
        hint = ""
        if not path.endswith((".yaml", ".yml")):
            hint = (" (a config override must be inside the quoted SPEC, e.g. "
                    "\"X.yaml::MODEL.RDSNET.MBRM.ENABLED True\")")
        raise BenchmarkError(f"config file not found: {path}{hint}")
    if len(own) % 2:
        raise BenchmarkError(f"SPEC {spec!r}: overrides must be KEY VALUE pairs, got {own}")
    if len(common_opts) % 2:
        raise BenchmarkError(f"--opts needs KEY VALUE pairs, got {list(common_opts)}")
    return path, list(common_opts) + own


def default_label(spec):
    path, _, rest = spec.partition(SPEC_SEPARATOR)
    name = os.path.splitext(os.path.basename(path))[0]
    return f"{name} [{rest.strip()}]" if rest.strip() else name


class Worker:
    """A worker subprocess benchmarking one config; see `worker_main` for the protocol."""

    def __init__(self, label, job):
        self.label, self.job = label, job
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--config-file", job["config_file"],
             "--worker", json.dumps(job)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
        )

    def send(self, command):
        try:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # reported by receive()

    def receive(self):
        for line in self.proc.stdout:
            if line.startswith(MESSAGE_PREFIX):
                message = json.loads(line[len(MESSAGE_PREFIX):])
                if message.get("error"):
                    raise BenchmarkError(f"config {self.label!r} ({self.job['config_file']}) "
                                         f"failed:\n{message['error']}")
                return message
            sys.stderr.write(line)  # not a protocol line (should not happen)
        code = self.proc.wait()
        raise BenchmarkError(f"worker for config {self.label!r} ({self.job['config_file']}) "
                             f"exited with code {code} (see its error output above)")

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def run(specs, labels=None, task="eval", size=(800, 1333), batch=1, iters=10, warmup=2,
        threads=0, opts=(), flops=False, calibrate=True, allow_unequal_work=False,
        datasets=()):
    """Benchmark `specs` (see the module docstring) and return one result dict per config.
    `datasets`: `--dataset NAME=ANN.json[:IMAGES]` values, registered in every worker."""
    if labels and len(labels) != len(specs):
        raise BenchmarkError(f"{len(labels)} labels for {len(specs)} configs")
    if iters < 1 or warmup < 0 or batch < 1:
        raise BenchmarkError("need --iters >= 1, --warmup >= 0 and --batch >= 1")
    labels = list(labels) if labels else [default_label(s) for s in specs]
    jobs = []
    for spec in specs:
        path, config_opts = parse_spec(spec, opts)
        jobs.append({"config_file": path, "opts": config_opts, "task": task,
                     "size": list(size), "batch": batch, "threads": threads,
                     "flops": flops, "calibrate": calibrate,
                     "datasets": list(datasets or ())})
    workers = []
    try:
        workers = [Worker(label, job) for label, job in zip(labels, jobs)]  # start in parallel
        infos = [w.receive() for w in workers]  # "ready" with params, device
        steps = [[] for _ in workers]
        for it in range(warmup + iters):
            for i, w in enumerate(workers):  # lock-step round-robin: one config at a time
                w.send("step")
                message = w.receive()
                if it >= warmup:
                    steps[i].append(message)
            if it + 1 == warmup:
                for w in workers:
                    w.send("reset_memory")
                    w.receive()
        finals = []
        for w in workers:
            w.send("finish")
            finals.append(w.receive())
    finally:
        for w in workers:
            w.close()
    results = []
    for label, job, info, final, st in zip(labels, jobs, infos, finals, steps):
        t = [m["seconds"] for m in st]
        results.append({
            "label": label, "config_file": job["config_file"], "opts": job["opts"],
            "device": info["device"], "params": info["params"],
            "weights_loaded": info["weights_loaded"], "calibrated_bn": info["calibrated_bn"],
            "feature_rms": info["feature_rms"], "gflops": info["gflops"],
            "proposal_topk": info["proposal_topk"], "times_s": t,
            "median_s": statistics.median(t), "mean_s": statistics.fmean(t),
            "stages_s": _median_stages(st),
            "median_stage_total_s": _median_iteration_seconds(st),
            "proposals_per_image": _mean_or_none([x for m in st for x in m["proposals"]]),
            "detections_per_image": _mean_or_none([x for m in st for x in m["detections"]]),
            "peak_mem_mb": final["peak_mem_mb"], "mem_kind": final["mem_kind"],
        })
    problems = equal_work_problems(results, task)
    refused = bool(problems) and not allow_unequal_work
    for r in results:
        r["equal_work_problems"] = problems
        r["ratio"] = (paired_ratio(r["times_s"], results[0]["times_s"])
                      if results[0]["median_s"] and not refused else None)
        r["flops_ratio"] = (r["gflops"] / results[0]["gflops"]
                            if r["gflops"] and results[0]["gflops"] else None)
    return results


def paired_ratio(times, reference_times):
    """Median over the lock-step rounds of ``times[k] / reference_times[k]``.

    Round k runs every config once, back to back, so a slow phase of a shared machine inflates
    the times of one round together; the per-round ratio cancels it, where the ratio of the
    two medians (taken from different rounds) would not.
    """
    if len(times) != len(reference_times) or not times:
        raise BenchmarkError(f"paired ratio needs one time per round for both configs, got "
                             f"{len(times)} and {len(reference_times)}")
    return statistics.median(t / r for t, r in zip(times, reference_times))


def _mean_or_none(values):
    return statistics.fmean(values) if values else None


def _median_iteration(step_messages):
    """The timed iteration whose total time is the median (the lower middle one for an even
    count), or None when no stages were measured. Its stages are reported whole, so that they
    and the "rest" add up to that iteration's time; per-stage medians taken over different
    iterations would not."""
    timed = sorted((m for m in step_messages if m.get("stages")), key=lambda m: m["seconds"])
    return timed[(len(timed) - 1) // 2] if timed else None


def _median_iteration_seconds(step_messages):
    """Total seconds of the iteration `_median_stages` reports (None when not measured)."""
    middle = _median_iteration(step_messages)
    return middle["seconds"] if middle else None


def _median_stages(step_messages):
    """Stage seconds of the median iteration ({} when not measured)."""
    middle = _median_iteration(step_messages)
    return dict(sorted(middle["stages"].items())) if middle else {}


def equal_work_problems(results, task):
    """Why the models of `results` did not do comparable work (empty list: they did).

    Inference: an R-CNN whose RPN returned fewer proposals per image than its
    POST_NMS_TOPK_TEST (a trained RPN always fills it on a full-size image; fewer means
    degenerate boxes, e.g. exploding activations), two R-CNNs with the same top-k but different
    proposal counts, and models with different detections per image (post-processing and
    mask heads scale with it). Training: R-CNNs with different proposal counts.
    """
    problems = []
    for r in results:
        topk, got = r["proposal_topk"], r["proposals_per_image"]
        if task == "eval" and topk is not None and got is not None and got < topk:
            problems.append(f"{r['label']}: its RPN returned {got:.0f} proposals per image, "
                            f"fewer than its POST_NMS_TOPK_TEST={topk}")
    ref = results[0]
    for r in results[1:]:
        if (r["proposals_per_image"] is not None and ref["proposals_per_image"] is not None
                and r["proposal_topk"] == ref["proposal_topk"]
                and r["proposals_per_image"] != ref["proposals_per_image"]):
            problems.append(f"{r['label']}: {r['proposals_per_image']:.1f} proposals per image, "
                            f"{ref['label']}: {ref['proposals_per_image']:.1f}")
        if (task == "eval" and r["detections_per_image"] != ref["detections_per_image"]):
            problems.append(f"{r['label']}: {r['detections_per_image']:.1f} detections per "
                            f"image, {ref['label']}: {ref['detections_per_image']:.1f}")
    return problems


def format_table(results):
    from tabulate import tabulate

    def fmt(value, spec):
        return format(value, spec) if value is not None else "-"

    stages = [s for s in STAGE_COLUMNS if any(s in r["stages_s"] for r in results)]
    rows = []
    for r in results:
        rest = (r["median_stage_total_s"] - sum(r["stages_s"].values())) if r["stages_s"] else None
        rows.append([r["label"], f"{r['median_s']:.4f}", f"{r['mean_s']:.4f}",
                     fmt(r["ratio"], ".3f"), fmt(r["gflops"], ".1f"), fmt(r["flops_ratio"], ".3f")]
                    + [fmt(r["stages_s"].get(s), ".4f") for s in stages]
                    + ([fmt(rest, ".4f")] if stages else [])
                    + [fmt(r["proposals_per_image"], ".0f"), fmt(r["detections_per_image"], ".1f"),
                       fmt(r["peak_mem_mb"], ".0f"), fmt(r["params"] and r["params"] / 1e6, ".2f")])
    headers = (["config", "median s/iter", "mean s/iter", "ratio vs first", "GFLOPs",
                "FLOPs ratio"] + [f"{s} s" for s in stages] + (["rest s"] if stages else [])
               + ["proposals/img", "detections/img", "peak mem MB", "params M"])
    return tabulate(rows, headers=headers, tablefmt="pipe")


def main(argv=None):
    args = get_parser().parse_args(argv)
    if args.worker is not None:
        return worker_main(json.loads(args.worker))
    start = time.perf_counter()
    results = run(args.config_file, args.label, args.task, args.size, args.batch, args.iters,
                  args.warmup, args.threads, args.opts, flops=args.flops,
                  calibrate=not args.no_calibrate, allow_unequal_work=args.allow_unequal_work,
                  datasets=args.dataset)
    mem = results[0]["mem_kind"]
    size = "" if args.task == "data" else f", {args.batch}x{args.size[0]}x{args.size[1]} images"
    print(f"task {args.task}{size}, {args.iters} timed + {args.warmup} warmup iterations per "
          f"config (round-robin), device {results[0]['device']}, threads "
          f"{args.threads or 'default'}; peak memory: {mem}; "
          f"{time.perf_counter() - start:.0f} s in total")
    print(format_table(results))
    random_init = [r["label"] for r in results if r["params"] is not None
                   and not r["weights_loaded"]]
    if random_init:
        print("random initialisation (MODEL.WEIGHTS empty or not loadable): "
              + ", ".join(random_init))
    calibrated = [r["label"] for r in results if r["calibrated_bn"]]
    if calibrated:
        print("frozen BatchNorm calibrated on the benchmark input (random weights): "
              + ", ".join(calibrated))
    print("largest backbone output RMS: " + ", ".join(
        f"{r['label']} {r['feature_rms']:.3g}" for r in results if r["feature_rms"] is not None))
    problems = results[0]["equal_work_problems"]
    if problems:
        verdict = ("ratios printed anyway (--allow-unequal-work)" if args.allow_unequal_work
                   else "no time ratio printed: the models did not do equal work "
                        "(--allow-unequal-work to print it anyway)")
        print(f"{verdict}:\n  " + "\n  ".join(problems))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"task": args.task, "size": args.size, "batch": args.batch,
                       "iters": args.iters, "warmup": args.warmup, "threads": args.threads,
                       "results": results}, f, indent=1)
    if problems and not args.allow_unequal_work:
        raise UnequalWork()
    return results


class UnequalWork(Exception):
    """Raised by `main` after printing a table whose ratios were refused (exit status 2)."""


# ----------------------------------------------------------------------------- worker side


def _current_rss_kb():
    """Resident set size of this process now, in KB (Linux /proc; else the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    except (OSError, ValueError, IndexError):
        return _peak_rss_kb()


def _peak_rss_kb():
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS, KB on Linux


def synthetic_batch(cfg, task, size, batch, generator):
    """`batch` Detectron2 input dicts with random HxW uint8 images; for training each has 3
    random ground-truth objects: boxes (XYXY absolute), classes and one polygon (an 8-gon
    inscribed in the box) per object."""
    import torch
    from detectron2.structures import Boxes, Instances, PolygonMasks
    from projects.config import NUM_CLASSES_KEYS

    h, w = size
    key = NUM_CLASSES_KEYS.get(cfg.MODEL.META_ARCHITECTURE, "MODEL.ROI_HEADS.NUM_CLASSES")
    num_classes = cfg
    for part in key.split("."):
        num_classes = num_classes[part]
    channels = len(cfg.MODEL.PIXEL_MEAN)
    inputs = []
    for _ in range(batch):
        image = torch.randint(0, 256, (channels, h, w), generator=generator, dtype=torch.uint8)
        d = {"image": image, "height": h, "width": w}
        if task == "train":
            n = 3
            wh = torch.rand(n, 2, generator=generator) * 0.4 + 0.1  # 10-50% of the image
            c = torch.rand(n, 2, generator=generator) * (1 - wh) + wh / 2
            scale = torch.tensor([w, h], dtype=torch.float32)
            boxes = torch.cat([(c - wh / 2) * scale, (c + wh / 2) * scale], dim=1)
            angles = torch.arange(8, dtype=torch.float32) * (2 * torch.pi / 8)
            polygons = []
            for (x0, y0, x1, y1) in boxes.tolist():
                cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
                xs, ys = cx + rx * torch.cos(angles), cy + ry * torch.sin(angles)
                polygons.append([torch.stack([xs, ys], dim=1).flatten().numpy()])
            instances = Instances((h, w))
            instances.gt_boxes = Boxes(boxes)
            instances.gt_classes = torch.randint(0, num_classes, (n,), generator=generator)
            instances.gt_masks = PolygonMasks(polygons)
            d["instances"] = instances
        inputs.append(d)
    return inputs


def worker_main(job):
    """Benchmark one config. Protocol: one `MESSAGE_PREFIX + json` line on the original
    stdout per command read from stdin (all other output goes to stderr): first {"ready", "params", "device"} (or {"error"}), then for "step"
    {"seconds"}, "reset_memory" {}, "finish" {"peak_mem_mb", "mem_kind"}."""

    # The protocol owns the original stdout; everything else the worker (or the model, at
    # Python or C level) writes to stdout goes to stderr instead.
    sys.stdout.flush()
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def reply(**message):
        protocol.write(MESSAGE_PREFIX + json.dumps(message) + "\n")
        protocol.flush()

    try:
        import torch
        from detectron2.utils.events import EventStorage

        from projects.tools_common import (
            count_parameters,
            get_trainer_class,
            setup_cfg,
            try_load_weights,
        )

        from projects.benchmarking import (
            StageTimer,
            WorkCounter,
            calibrate_frozen_batchnorm,
            feature_rms,
            instrument_model,
        )

        if job["threads"]:
            torch.set_num_threads(job["threads"])
        torch.manual_seed(0)
        cfg = setup_cfg(job["config_file"], job["opts"], datasets=job.get("datasets", ()))
        device = cfg.MODEL.DEVICE
        on_cuda = device.startswith("cuda")
        trainer_cls = get_trainer_class()
        rss_before_kb = _current_rss_kb()
        params, weights_loaded, calibrated, rms, gflops, topk = None, False, 0, None, None, None
        timer = StageTimer(torch.cuda.synchronize if on_cuda else None)
        counter = WorkCounter()
        detections = []
        storage = EventStorage(0)
        storage.__enter__()  # models log to the current storage during training
        if job["task"] == "data":
            data_iter = iter(trainer_cls.build_train_loader(cfg))

            def step():
                next(data_iter)
        else:
            model = trainer_cls.build_model(cfg)
            params = count_parameters(model)
            weights_loaded = try_load_weights(model, cfg.MODEL.WEIGHTS)
            generator = torch.Generator().manual_seed(0)
            inputs = synthetic_batch(cfg, job["task"], job["size"], job["batch"], generator)
            if not weights_loaded and job.get("calibrate", True):
                calibrated = calibrate_frozen_batchnorm(model, inputs)
            model.eval()
            rms = feature_rms(model, inputs)
            if not rms < 1e3:  # also catches nan / inf
                raise RuntimeError(
                    f"backbone outputs explode (largest RMS {rms:.3g}): the benchmark would "
                    "not measure a working model; load trained MODEL.WEIGHTS or normalise "
                    "the inputs (MODEL.PIXEL_STD)")
            if job.get("flops"):
                sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
                from analyze_model import flop_analysis

                with torch.no_grad():
                    gflops = flop_analysis(model, inputs).total() / 1e9
            if getattr(model, "proposal_generator", None) is not None:
                rpn = cfg.MODEL.RPN
                topk = rpn.POST_NMS_TOPK_TRAIN if job["task"] == "train" else rpn.POST_NMS_TOPK_TEST
            if job["task"] == "eval":
                instrument_model(model, timer, counter)
            elif getattr(model, "proposal_generator", None) is not None:
                counter.wrap_proposal_generator(model.proposal_generator)
            if job["task"] == "train":
                model.train()
                optimizer = trainer_cls.build_optimizer(cfg, model)

                def step():
                    loss_dict = model(inputs)
                    losses = sum(loss_dict.values())
                    optimizer.zero_grad()
                    losses.backward()
                    optimizer.step()
                    storage.step()
            else:
                model.eval()

                def step():
                    with torch.no_grad():
                        outputs = model(inputs)
                    detections[:] = [len(o["instances"]) for o in outputs]
        reply(ready=True, params=params, device=device, weights_loaded=weights_loaded,
              calibrated_bn=calibrated, feature_rms=rms, gflops=gflops, proposal_topk=topk)
    except Exception:  # noqa: BLE001  (reported to the parent with the config's name)
        import traceback

        reply(error=traceback.format_exc())
        return 1

    for command in sys.stdin:
        command = command.strip()
        try:
            if command == "step":
                if on_cuda:
                    torch.cuda.synchronize()
                timer.reset()
                start = time.perf_counter()
                step()
                if on_cuda:
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - start
                reply(seconds=seconds, proposals=counter.proposals, detections=detections,
                      stages=dict(timer.seconds) if job["task"] == "eval" else {})
            elif command == "reset_memory":
                if on_cuda:
                    torch.cuda.reset_peak_memory_stats()
                reply()
            elif command == "finish":
                if on_cuda:
                    reply(peak_mem_mb=torch.cuda.max_memory_allocated() / 2**20,
                          mem_kind="CUDA max_memory_allocated")
                else:
                    reply(peak_mem_mb=max(0, _peak_rss_kb() - rss_before_kb) / 1024,
                          mem_kind="CPU peak RSS increase")
                return 0
        except Exception:  # noqa: BLE001
            import traceback

            reply(error=traceback.format_exc())
            return 1
    return 0


if __name__ == "__main__":
    if "--worker" in sys.argv:
        sys.exit(main())
    try:
        main()
    except BenchmarkError as e:
        sys.exit(f"error: {e}")
    except UnequalWork:
        sys.exit(2)
