"""Gradient clipping by the global norm of all parameters together.

Detectron2's ``SOLVER.CLIP_GRADIENTS`` clips each parameter tensor on its own (``CLIP_TYPE``
``"value"`` or ``"norm"``). The TSD and RDSNet authors train with mmcv's
``grad_clip=dict(max_norm=35, norm_type=2)``, which rescales *all* gradients by one factor so
that their joint norm

    ||g|| = (sum over every parameter p of sum(|g_p| ** norm_type)) ** (1 / norm_type)

is at most ``max_norm`` (``torch.nn.utils.clip_grad_norm_`` over the whole model). This module
adds that as ``CLIP_TYPE: "full_model_norm"`` (``CLIP_VALUE`` = max norm, ``NORM_TYPE`` = p),
through the same path Detectron2 uses for its own clipping: the optimizer built by
``build_optimizer`` gets a subclass whose ``step`` clips first. With DDP the gradients are already averaged when ``step`` runs, so
every process computes the same norm; with AMP, Detectron2's ``GradScaler.step`` unscales the
gradients before calling ``step``.
"""
import copy
import logging

import torch

from ..config import CLIP_TYPES, FULL_MODEL_NORM, check_clip_gradients

__all__ = ["FULL_MODEL_NORM", "CLIP_TYPES", "check_clip_gradients", "global_norm_clipper",
           "with_global_norm_clipping", "add_global_norm_clipping", "build_optimizer_with_clipping",
           "global_norm_clipped_sgd"]


logger = logging.getLogger(__name__)


def global_norm_clipper(max_norm: float, norm_type: float = 2.0):
    """A function of an iterable of parameters that rescales their gradients together so that
    their joint ``norm_type``-norm is at most ``max_norm``; returns the norm before clipping."""
    max_norm, norm_type = float(max_norm), float(norm_type)

    def clip(params):
        params = [p for p in params if p.grad is not None]
        if not params:
            return torch.tensor(0.0)
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)

    return clip


def with_global_norm_clipping(optimizer_cls, max_norm: float, norm_type: float = 2.0):
    """A subclass of ``optimizer_cls`` whose ``step`` first clips the global gradient norm of
    all its parameter groups (usable directly, e.g. as a LazyConfig optimizer target)."""
    clipper = global_norm_clipper(max_norm, norm_type)

    def step(self, closure=None):
        clipper(p for group in self.param_groups for p in group["params"])
        return optimizer_cls.step(self, closure)

    return type(optimizer_cls.__name__ + "WithGlobalNormClip", (optimizer_cls,),
                {"step": step, "max_norm": float(max_norm), "norm_type": float(norm_type)})


def add_global_norm_clipping(optimizer: torch.optim.Optimizer, max_norm: float,
                             norm_type: float = 2.0) -> torch.optim.Optimizer:
    """Make ``optimizer.step`` clip the global gradient norm of all its parameter groups first
    (in place, as Detectron2's ``maybe_add_gradient_clipping`` does for an instance)."""
    optimizer.__class__ = with_global_norm_clipping(type(optimizer), max_norm, norm_type)
    return optimizer


def build_optimizer_with_clipping(cfg, model, build_fn):
    """``build_fn(cfg, model)`` (e.g. Detectron2's ``build_optimizer``), with
    ``CLIP_TYPE: "full_model_norm"`` handled here and every other type left to Detectron2."""
    check_clip_gradients(cfg)
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if not (clip.ENABLED and clip.CLIP_TYPE == FULL_MODEL_NORM):
        return build_fn(cfg, model)
    inner = copy.deepcopy(cfg)
    inner.defrost()
    inner.SOLVER.CLIP_GRADIENTS.ENABLED = False  # Detectron2 would reject the type
    optimizer = build_fn(inner, model)
    logger.info("Clipping the global gradient norm (p=%s) of all parameters at %s",
                clip.NORM_TYPE, clip.CLIP_VALUE)
    return add_global_norm_clipping(optimizer, clip.CLIP_VALUE, clip.NORM_TYPE)


def global_norm_clipped_sgd(params, *, max_norm: float, norm_type: float = 2.0, **sgd_kwargs):
    """``torch.optim.SGD(params, **sgd_kwargs)`` whose ``step`` clips the global gradient norm at
    ``max_norm`` first (the LazyConfig form of ``CLIP_TYPE: full_model_norm``)."""
    return with_global_norm_clipping(torch.optim.SGD, max_norm, norm_type)(params, **sgd_kwargs)
