"""Training and evaluation entry points shared by every method."""
from .trainer import Trainer
from .train import argument_parser, main, setup

__all__ = ["Trainer", "argument_parser", "main", "setup"]
