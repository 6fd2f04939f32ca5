"""`Predictor`: Detectron2's `DefaultPredictor` that refuses weights that do not fit the model."""
from detectron2.engine import DefaultPredictor

from .checkpoint import MIN_LOADED_FRACTION_FOR_INFERENCE, VerifiedCheckpointer

__all__ = ["Predictor"]


class Predictor(DefaultPredictor):
    """`DefaultPredictor` (BGR image in, ``{"instances": ...}`` out) whose ``MODEL.WEIGHTS``
    is loaded by `VerifiedCheckpointer`: a file that is not a checkpoint, or one that fills
    fewer than ``min_loaded_fraction`` of the model's parameter tensors, is an error naming
    the file (Detectron2's predictor would predict with random weights after a warning)."""

    def __init__(self, cfg, min_loaded_fraction: float = MIN_LOADED_FRACTION_FOR_INFERENCE):
        bare = cfg.clone()
        bare.defrost()
        bare.MODEL.WEIGHTS = ""  # DefaultPredictor builds the model; the weights are loaded here
        super().__init__(bare)
        self.cfg.MODEL.WEIGHTS = cfg.MODEL.WEIGHTS
        VerifiedCheckpointer(self.model, min_loaded_fraction=min_loaded_fraction).load(
            cfg.MODEL.WEIGHTS)
