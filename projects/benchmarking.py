"""What `tools/benchmark.py` needs to compare models doing equal work.

A randomly initialised detector does not do a trained detector's work: with frozen BatchNorm
left at identity statistics its activations grow layer after layer, the RPN's boxes degenerate
and only a handful of proposals survive, so its ROI heads have almost nothing to do. This
module

- re-centres frozen BatchNorm on the statistics of the benchmark's own input
  (`calibrate_frozen_batchnorm`), so that every normalised activation of a random model has
  zero mean and unit variance per channel, as in a trained network;
- measures how large the backbone's outputs are (`feature_rms`), so a benchmark can refuse a
  model whose activations still explode;
- splits one forward pass into stages (`StageTimer`: backbone, proposal generator, heads,
  post-processing, and the rest) and counts the work each stage did (`WorkCounter`: proposals
  and detections per image).
"""
import time
from collections import defaultdict
from typing import Callable, Dict, List

import torch
from torch import nn

from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers

__all__ = ["calibrate_frozen_batchnorm", "feature_rms", "StageTimer", "WorkCounter",
           "instrument_model", "STAGES"]

STAGES = ("backbone", "proposals", "heads", "postprocess")


@torch.no_grad()
def calibrate_frozen_batchnorm(model: nn.Module, batched_inputs: List[dict]) -> int:
    """Set every `FrozenBatchNorm2d` of `model` to normalise its input on `batched_inputs`.

    One forward pass in inference mode; just before each frozen BatchNorm runs, its
    ``running_mean`` / ``running_var`` become the per-channel mean / variance of the input it
    receives, so its output has zero mean and unit variance per channel (times its affine
    weight, plus its bias). Layers run in order, so each one is calibrated on the output of
    the already-calibrated layers before it. Returns the number of layers calibrated.
    """
    from detectron2.layers import FrozenBatchNorm2d

    def set_statistics(module, args):
        x = args[0]
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3), unbiased=False))

    handles = [m.register_forward_pre_hook(set_statistics)
               for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    if handles:
        was_training = model.training
        model.eval()
        try:
            model(batched_inputs)
        finally:
            model.train(was_training)
            for h in handles:
                h.remove()
    return len(handles)


@torch.no_grad()
def feature_rms(model: nn.Module, batched_inputs: List[dict]) -> float:
    """Largest root-mean-square value over the backbone's output maps on `batched_inputs`
    (inf if any value is not finite). About 1 for a trained or calibrated network."""
    images = model.preprocess_image(batched_inputs)
    tensor = images.tensor if hasattr(images, "tensor") else images
    features = model.backbone(tensor)
    worst = 0.0
    for f in features.values():
        if not torch.isfinite(f).all():
            return float("inf")
        worst = max(worst, f.float().pow(2).mean().sqrt().item())
    return worst


class StageTimer:
    """Exclusive wall time of named stages of a forward pass.

    `wrap(stage, obj, attr)` replaces the callable ``obj.attr`` with a timed one. Stages may
    nest (post-processing runs inside the ROI heads): each call's time is charged to its own
    stage minus the time of the timed calls inside it, so the stage times of one pass add up
    to the time spent inside timed calls. With ``sync`` (CUDA) the device is synchronised at
    every boundary so that asynchronous kernels are charged to the stage that launched them.
    """

    def __init__(self, sync: Callable[[], None] = None):
        self._sync = sync or (lambda: None)
        self._stack = []  # [stage, start, time of timed calls inside]
        self.seconds: Dict[str, float] = defaultdict(float)

    def reset(self):
        self.seconds = defaultdict(float)

    def wrap(self, stage: str, obj, attr: str):
        inner = getattr(obj, attr)

        def timed(*args, **kwargs):
            self._sync()
            self._stack.append([stage, time.perf_counter(), 0.0])
            try:
                return inner(*args, **kwargs)
            finally:
                self._sync()
                name, start, children = self._stack.pop()
                spent = time.perf_counter() - start
                self.seconds[name] += spent - children
                if self._stack:
                    self._stack[-1][2] += spent

        setattr(obj, attr, timed)


class WorkCounter:
    """Proposals per image (what the proposal generator returned) of the last forward."""

    def __init__(self):
        self.proposals: List[int] = []

    def wrap_proposal_generator(self, generator: nn.Module):
        inner = generator.forward

        def counted(*args, **kwargs):
            out = inner(*args, **kwargs)
            self.proposals = [len(p) for p in out[0]]
            return out

        generator.forward = counted


def _patch_module_function(module, name: str, timer: StageTimer):
    """Time the module-level function ``module.name`` as post-processing (every caller that
    looks it up in that module at call time is timed). A function timed for an earlier timer
    is unwrapped first, so it is charged to `timer` only, and only once."""
    fn = getattr(module, name, None)
    if fn is None:
        return
    original = getattr(fn, "_benchmark_original", fn)
    setattr(module, name, original)
    timer.wrap("postprocess", module, name)
    getattr(module, name)._benchmark_original = original


def instrument_model(model: nn.Module, timer: StageTimer, counter: WorkCounter):
    """Attach `timer` and `counter` to the parts of a Detectron2 meta-architecture.

    backbone: ``model.backbone``; proposals: ``model.proposal_generator``; heads:
    ``model.roi_heads`` or the dense heads (``model.head``, and RDSNet's ``pixel_stream``);
    postprocess: box predictors' ``inference`` (score threshold, NMS, top-k), the dense
    detectors' ``inference`` / ``postprocess`` methods and Detectron2's
    ``detector_postprocess`` (rescaling, mask pasting). Everything else (input normalisation
    and padding, anchors) is what remains of the total.
    """
    timer.wrap("backbone", model.backbone, "forward")
    generator = getattr(model, "proposal_generator", None)
    if generator is not None:
        counter.wrap_proposal_generator(generator)
        timer.wrap("proposals", generator, "forward")
    for name in ("roi_heads", "head", "pixel_stream"):
        part = getattr(model, name, None)
        if isinstance(part, nn.Module):
            timer.wrap("heads", part, "forward")
    roi_heads = getattr(model, "roi_heads", None)
    if roi_heads is not None:
        # every box predictor inside the ROI heads (cascade stages, TSD's sibling head,
        # Decoupled R-CNN's predictor), by its inference entry points
        for part in roi_heads.modules():
            if not isinstance(part, FastRCNNOutputLayers):
                continue
            for name in ("inference", "postprocess"):
                if callable(getattr(part, name, None)):
                    timer.wrap("postprocess", part, name)
    else:
        for name in ("inference", "inference_single_image", "postprocess"):
            if callable(getattr(model, name, None)):
                timer.wrap("postprocess", model, name)
    import importlib

    modules = ["detectron2.modeling.meta_arch.rcnn", "detectron2.modeling.meta_arch.retinanet",
               "detectron2.modeling.meta_arch.dense_detector",  # Detectron2 main only
               type(model).__module__]
    heads_modules = {type(m).__module__ for m in roi_heads.modules()} if roi_heads else set()
    for name in modules + sorted(heads_modules):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        _patch_module_function(module, "detector_postprocess", timer)
        # ROI heads that call Detectron2's box inference directly (e.g. a cascade's last stage)
        _patch_module_function(module, "fast_rcnn_inference", timer)
