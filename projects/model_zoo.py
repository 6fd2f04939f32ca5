"""Find the configs shipped with the package by relative name, like `detectron2.model_zoo`,
but through `importlib.resources` (no `pkg_resources`)."""
import importlib.resources
import os

from .config import get_cfg

__all__ = ["get_config_file", "get_config", "list_configs"]


def _configs_root():
    return importlib.resources.files("projects") / "configs"


def list_configs():
    """Relative names of every shipped leaf config (``Base-*`` files excluded)."""
    root = str(_configs_root())
    out = []
    for dirpath, _, files in os.walk(root, followlinks=True):
        for f in files:
            if f.endswith(".yaml") and not f.startswith("Base-"):
                out.append(os.path.relpath(os.path.join(dirpath, f), root))
    return sorted(out)


def get_config_file(name: str) -> str:
    """Absolute path of the shipped config ``name``, e.g. ``"res2net/mask_rcnn_R2_50_FPN_2x.yaml"``."""
    path = _configs_root() / name
    if not path.is_file():
        import difflib

        close = difflib.get_close_matches(name, list_configs(), n=3, cutoff=0.4)
        raise FileNotFoundError(
            f"{name!r} is not a shipped config" + (f"; did you mean {close}?" if close else "")
        )
    return str(path)


def get_config(name: str, trained: bool = False):
    """A config with every method's keys, merged from the shipped config ``name``."""
    if trained:
        raise ValueError(
            f"no trained checkpoint is published for {name!r}; convert the authors' weights with "
            "the method's tools/convert_*.py and set MODEL.WEIGHTS"
        )
    cfg = get_cfg()
    cfg.merge_from_file(get_config_file(name))
    return cfg
