"""Checkpoint-conversion helpers shared by the per-method converters.

A converter maps every key of an upstream state dict (official code base, mmdetection,
maskrcnn-benchmark, timm ...) to this project's Detectron2 naming, or drops it explicitly.
`convert_state_dict` enforces the contract: unknown keys are an error that names them,
two source keys may not land on one target, and, given the target model's state dict, every
target key must be filled with a tensor of the right shape.
"""
import re
from collections import OrderedDict
from typing import Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = [
    "DROP",
    "ConversionError",
    "apply_rules",
    "convert_state_dict",
    "load_upstream_state_dict",
    "save_converted_checkpoint",
]

# Returned by a mapping function for a key that is dropped on purpose (e.g. an ImageNet `fc`).
DROP = object()


class ConversionError(ValueError):
    """A checkpoint could not be converted; the message lists every offending key."""


def load_upstream_state_dict(path: str) -> "OrderedDict[str, torch.Tensor]":
    """Read an upstream checkpoint file into a flat ``{name: tensor}`` dict on CPU.

    Upstream files (mmdetection, maskrcnn-benchmark) pickle numpy arrays and other objects in
    their ``meta``; they are opened with ``weights_only=False``, so only convert files you trust.
    Common containers (``state_dict``, ``model``) and a DataParallel ``module.`` prefix are
    unwrapped; numpy arrays become tensors.
    """
    obj = torch.load(path, map_location="cpu", weights_only=False)
    for container in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(container), Mapping):
            obj = obj[container]
            break
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path}: expected a state dict, found {type(obj).__name__}")
    out = OrderedDict()
    for key, value in obj.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(value)
        if not isinstance(value, torch.Tensor):
            raise ConversionError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        out[key[len("module."):] if key.startswith("module.") else key] = value
    return out


def apply_rules(key: str, rules: Sequence[Tuple[str, str]]) -> str:
    """Apply ``(regex, replacement)`` rules to ``key`` in order; return the rewritten key."""
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def convert_state_dict(
    source: Mapping[str, torch.Tensor],
    map_key: Callable[[str], object],
    target_shapes: Optional[Mapping[str, Iterable[int]]] = None,
    transform: Optional[Callable[[str, str, torch.Tensor], torch.Tensor]] = None,
) -> "OrderedDict[str, torch.Tensor]":
    """Rename every key of ``source`` with ``map_key`` and check the result.

    Args:
        source: upstream ``{name: tensor}``.
        map_key: returns the target name, `DROP` for a key dropped on purpose, or ``None`` for
            a key it does not know (collected and reported together as an error).
        target_shapes: ``{name: shape}`` of the model the result must load into (e.g.
            ``{k: v.shape for k, v in model.state_dict().items()}``). When given, every target
            key must be produced and every shape must match.
        transform: optional ``(source_key, target_key, tensor) -> tensor`` for value changes
            (row reordering, splitting); applied before the shape check.

    Returns:
        The converted ``OrderedDict`` in source order.
    """
    unknown, out, origin = [], OrderedDict(), {}
    for key, value in source.items():
        new = map_key(key)
        if new is DROP:
            continue
        if new is None:
            unknown.append(key)
            continue
        if new in out:
            raise ConversionError(f"source keys {origin[new]!r} and {key!r} both map to {new!r}")
        out[new] = transform(key, new, value) if transform is not None else value
        origin[new] = key
    if unknown:
        raise ConversionError(f"{len(unknown)} unknown source key(s): {', '.join(unknown)}")
    if target_shapes is not None:
        target_shapes = {k: tuple(s) for k, s in target_shapes.items()}
        missing = sorted(set(target_shapes) - set(out))
        extra = sorted(set(out) - set(target_shapes))
        wrong = [
            f"{k} (from {origin[k]}): {tuple(v.shape)} != {target_shapes[k]}"
            for k, v in out.items()
            if k in target_shapes and tuple(v.shape) != target_shapes[k]
        ]
        problems = []
        if missing:
            problems.append(f"target keys not filled: {', '.join(missing)}")
        if extra:
            problems.append(f"converted keys the target lacks: {', '.join(extra)}")
        if wrong:
            problems.append(f"shape mismatches: {'; '.join(wrong)}")
        if problems:
            raise ConversionError(" | ".join(problems))
    return out


def save_converted_checkpoint(state_dict: Dict[str, torch.Tensor], path: str, author: str) -> None:
    """Write a tensors-only ``{"model": ...}`` file that ``MODEL.WEIGHTS`` accepts.

    Keys are exact (no ``matching_heuristics``), so `DetectionCheckpointer` loads them as is.
    """
    torch.save({"model": OrderedDict(state_dict), "__author__": author}, path)
