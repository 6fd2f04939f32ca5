"""Training and evaluation entry points shared by every method."""
from .checkpoint import CheckpointError, VerifiedCheckpointer
from .predictor import Predictor
from .trainer import Trainer
from .train import argument_parser, main, setup

__all__ = ["CheckpointError", "Predictor", "Trainer", "VerifiedCheckpointer", "argument_parser",
           "main", "setup"]
