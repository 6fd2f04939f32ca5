"""Exponential moving average (EMA) of the model weights, for every method.

After every optimizer step ``t`` (from ``MODEL_EMA.START_ITER`` on) each floating-point entry
``w`` of the model's ``state_dict`` (parameters and buffers) updates its average

    ema_t = decay * ema_{t-1} + (1 - decay) * w_t,        ema_{START_ITER - 1} = w

so after ``k`` updates ``ema_k = decay^k * w_0 + (1 - decay) * sum_i decay^(k-i) * w_i``; integer
entries (e.g. ``num_batches_tracked``) are copied. Before ``START_ITER`` the average follows the
model. This is the usual "model EMA" of detection toolboxes (e.g. MMDetection's
``ExpMomentumEMA`` / YOLOX's EMA with ``momentum = 1 - decay``).

With ``MODEL_EMA.ENABLED``:

* training keeps the average in `EMAHook` (DDP: every process averages its own replica; the
  replicas are identical, so the averages are too) and saves it in every checkpoint under the
  key ``"ema"`` (the raw weights stay under ``"model"``; ``--resume`` restores both);
* evaluation (the periodic / final evaluation, test-time augmentation and ``--eval-only`` on a
  checkpoint that holds ``"ema"``) runs on the averaged weights.
"""
import contextlib
import logging
import weakref
from typing import Dict

import torch
from detectron2.engine import HookBase

__all__ = ["ModelEMA", "EMAHook", "ema_weights_applied",
           "load_ema_from_checkpoint", "unwrap_model"]

logger = logging.getLogger(__name__)

# unwrapped model -> its ModelEMA; lets evaluation find the average of the model it is given.
_EMA_OF_MODEL = weakref.WeakKeyDictionary()


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a (Distributed)DataParallel wrapper, or ``model`` itself."""
    if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        return model.module
    return model


class ModelEMA:
    """The moving average of one model's ``state_dict`` (keys without a DDP ``module.``)."""

    def __init__(self, model: torch.nn.Module, decay: float, device: str = ""):
        self.model_ref = weakref.ref(unwrap_model(model))
        self.decay = float(decay)
        self.device = device or None
        self.state: Dict[str, torch.Tensor] = {}
        self.num_updates = 0
        self.restored = False  # set when a checkpoint's "ema" was loaded (``--resume``)
        self.reset()
        _EMA_OF_MODEL[unwrap_model(model)] = self

    def _model(self):
        model = self.model_ref()
        if model is None:
            raise RuntimeError("the model of this ModelEMA no longer exists")
        return model

    @torch.no_grad()
    def reset(self):
        """Set the average to the model's current weights."""
        self.state = {k: v.detach().clone().to(self.device or v.device)
                      for k, v in self._model().state_dict().items()}
        self.num_updates = 0

    @torch.no_grad()
    def update(self):
        """One step of ``ema = decay * ema + (1 - decay) * w``."""
        for k, w in self._model().state_dict().items():
            avg = self.state[k]
            w = w.detach().to(avg.device)
            if avg.is_floating_point():
                avg.mul_(self.decay).add_(w, alpha=1.0 - self.decay)
            else:
                avg.copy_(w)
        self.num_updates += 1

    def state_dict(self):
        """Checkpoint content: the averaged weights and the number of updates."""
        return {"weights": self.state, "num_updates": self.num_updates, "decay": self.decay}

    def load_state_dict(self, state):
        weights = state["weights"] if "weights" in state else state
        own = self._model().state_dict()
        missing = sorted(set(own) - set(weights))
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} model entries, e.g. {missing[:3]}")
        self.state = {k: weights[k].detach().clone().to(self.device or own[k].device)
                      for k in own}
        self.num_updates = int(state.get("num_updates", 0))
        self.restored = True

    @contextlib.contextmanager
    def applied(self):
        """Within the block the model holds the averaged weights; the raw ones come back after."""
        model = self._model()
        raw = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict({k: v for k, v in self.state.items()})
        try:
            yield model
        finally:
            model.load_state_dict(raw)


@contextlib.contextmanager
def ema_weights_applied(model: torch.nn.Module):
    """If ``model`` (or the module inside its DDP wrapper) has a `ModelEMA`, evaluate with the
    averaged weights within the block; otherwise do nothing."""
    ema = _EMA_OF_MODEL.get(unwrap_model(model))
    if ema is None:
        yield model
        return
    logger.info("Evaluating the EMA weights (%d updates, decay %s)", ema.num_updates, ema.decay)
    with ema.applied():
        yield model


def load_ema_from_checkpoint(model: torch.nn.Module, checkpoint: dict, source: str):
    """Copy the ``"ema"`` weights of a loaded checkpoint (what `DetectionCheckpointer.load`
    returns besides ``"model"``) into ``model``; a clear error when there are none."""
    if not isinstance(checkpoint, dict) or "ema" not in checkpoint:
        raise KeyError(f"MODEL_EMA.ENABLED is set but checkpoint {source!r} holds no 'ema' "
                       "weights (it was trained without MODEL_EMA); set MODEL_EMA.ENABLED False "
                       "to evaluate its raw weights")
    ema = checkpoint["ema"]
    weights = ema["weights"] if "weights" in ema else ema
    incompatible = unwrap_model(model).load_state_dict(weights, strict=True)
    logger.info("Loaded the EMA weights of %s (%s updates)", source, ema.get("num_updates", "?"))
    return incompatible


class EMAHook(HookBase):
    """Keeps the `ModelEMA` of the trainer's model: starts it from the weights training starts
    with (unless ``--resume`` restored it from a checkpoint) and updates it after each step."""

    def __init__(self, ema: ModelEMA, start_iter: int = 0):
        self.ema = ema
        self.start_iter = int(start_iter)

    def before_train(self):
        if not self.ema.restored:
            self.ema.reset()

    def after_step(self):
        if self.trainer.iter < self.start_iter:
            self.ema.reset()
        else:
            self.ema.update()
