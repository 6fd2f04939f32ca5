"""`VerifiedCheckpointer`: Detectron2's `DetectionCheckpointer` with crash-safe writes, a
verified `--resume`, and clear errors for files that are not checkpoints.

* **Safe writes.** A checkpoint is written to a hidden temporary file in the same folder,
  flushed to disk and renamed into place (`os.replace` is atomic on POSIX and Windows);
  ``last_checkpoint`` is rewritten the same way, after the file it names is complete. A process
  killed at any moment leaves either the old or the new file, never a truncated one.
* **Verified resume.** ``resume_or_load(..., resume=True)`` reads the file ``last_checkpoint``
  names completely before using it; a file that does not load (truncated or corrupted by
  something else) is skipped with a warning naming it and the previous complete checkpoint
  that is used instead.
* **Bad weights.** A file that `torch.load` cannot read, or whose ``model`` entry is not a
  ``{name: tensor}`` mapping, raises `CheckpointError` naming the file and what was found.
  With ``min_loaded_fraction`` set (evaluation, `projects.engine.Predictor`), a checkpoint that
  fills fewer of the model's parameter tensors is an error with the counts, instead of a model
  that silently keeps random weights.
* **Module state across configurations.** Before Detectron2 drops entries whose shape differs
  from the model's, every submodule that defines ``fit_checkpoint_state(state_dict, prefix)``
  may rewrite its own entries (e.g. Dynamic R-CNN's per-process windows after a change of world
  size or ``UPDATE_ITERS``).
"""
import glob
import logging
import os
from collections.abc import Mapping
from typing import Optional
from urllib.parse import urlparse

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from fvcore.common.checkpoint import _strip_prefix_if_present

__all__ = ["CheckpointError", "VerifiedCheckpointer", "MIN_LOADED_FRACTION_FOR_INFERENCE"]

logger = logging.getLogger(__name__)

# Evaluation and prediction refuse a MODEL.WEIGHTS file that fills fewer than this fraction of
# the model's parameter tensors (the rest would keep their random initial values).
MIN_LOADED_FRACTION_FOR_INFERENCE = 0.9

_TMP_SUFFIX = ".tmp"


class CheckpointError(ValueError):
    """A file is not a usable checkpoint; the message names the file and what was found."""


def _describe(obj) -> str:
    if isinstance(obj, Mapping):
        keys = list(obj.keys())
        return f"a mapping with keys {keys[:8]}{' ...' if len(keys) > 8 else ''}"
    return f"a {type(obj).__name__}"


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: str, write) -> None:
    """Write ``path`` through ``write(file)`` into a temporary file, then rename it into place."""
    folder, base = os.path.split(path)
    tmp = os.path.join(folder, f".{base}.{os.getpid()}{_TMP_SUFFIX}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(folder or ".")


class VerifiedCheckpointer(DetectionCheckpointer):
    """`DetectionCheckpointer` with atomic saves, a verified resume and clear load errors.

    Args:
        model, save_dir, save_to_disk, checkpointables: as `DetectionCheckpointer`.
        min_loaded_fraction: if set, `load` raises `CheckpointError` when the checkpoint fills
            fewer than this fraction of the model's parameter tensors (name and shape must
            match). Use it where random weights would be wrong: evaluation and prediction.
    """

    def __init__(self, model, save_dir="", *, save_to_disk=None,
                 min_loaded_fraction: Optional[float] = None, **checkpointables):
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        if min_loaded_fraction is not None and not 0.0 < min_loaded_fraction <= 1.0:
            raise ValueError(f"min_loaded_fraction must lie in (0, 1], got {min_loaded_fraction}")
        self.min_loaded_fraction = min_loaded_fraction
        self._verified = None  # (path, loaded dict) read by the resume check

    @classmethod
    def like(cls, checkpointer: DetectionCheckpointer, **kwargs) -> "VerifiedCheckpointer":
        """A `VerifiedCheckpointer` with the model, folder and checkpointables of another one."""
        return cls(checkpointer.model, checkpointer.save_dir,
                   save_to_disk=checkpointer.save_to_disk, **kwargs,
                   **checkpointer.checkpointables)

    # ------------------------------------------------------------------ saving
    def save(self, name: str, **kwargs) -> None:
        """`Checkpointer.save`, written to a temporary file and renamed into place."""
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        if os.path.basename(save_file) != basename:
            raise ValueError(f"checkpoint name {name!r} must not contain a folder")
        self.logger.info(f"Saving checkpoint to {save_file}")
        os.makedirs(self.save_dir, exist_ok=True)
        _atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        """Point ``last_checkpoint`` at a (complete) file, atomically."""
        _atomic_write(os.path.join(self.save_dir, "last_checkpoint"),
                      lambda f: f.write(last_filename_basename.encode()))

    # ------------------------------------------------------------------ resuming
    def verify(self, path: str, keep: bool = False) -> Optional[str]:
        """Read ``path`` completely; return None if it is a usable checkpoint, else the reason.
        With ``keep``, the next `load` of ``path`` uses what was read."""
        # Detectron2 main's _load_file reads the URL that load() parsed (and asserts it is set)
        outside_load = getattr(self, "_parsed_url_during_load", False) is None
        if outside_load:
            self._parsed_url_during_load = urlparse(path)
        try:
            data = self._load_file(path)
        except (CheckpointError, OSError) as e:
            return str(e)
        finally:
            if outside_load:
                self._parsed_url_during_load = None
        if keep:
            self._verified = (path, data)
        return None

    def resume_or_load(self, path: str, *, resume: bool = True):
        """As `Checkpointer.resume_or_load`; when resuming, the file ``last_checkpoint`` names is
        verified first and, if unusable, the newest complete ``*.pth`` of the folder is used."""
        if resume:
            self._remove_stale_temporary_files()
        if not (resume and self.has_checkpoint()):
            return self.load(path, checkpointables=[])
        last = self.get_checkpoint_file()
        problem = (self.verify(last, keep=True) if os.path.isfile(last)
                   else "the file does not exist")
        if problem is None:
            return self.load(last)
        candidates = sorted(
            (f for f in self.get_all_checkpoint_files()
             if os.path.abspath(f) != os.path.abspath(last)),
            key=lambda f: (os.path.getmtime(f), f), reverse=True,
        )
        for candidate in candidates:
            if self.verify(candidate, keep=True) is None:
                self.logger.warning(
                    f"Cannot resume from {last} ({problem}); resuming from the previous "
                    f"complete checkpoint {candidate} instead."
                )
                return self.load(candidate)
        raise CheckpointError(
            f"cannot resume: {last} (named by {os.path.join(self.save_dir, 'last_checkpoint')}) "
            f"is unusable ({problem}) and no other complete checkpoint exists in "
            f"{self.save_dir}. Delete last_checkpoint to start over."
        )

    def _remove_stale_temporary_files(self) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        for tmp in glob.glob(os.path.join(glob.escape(self.save_dir), f".*{_TMP_SUFFIX}")):
            self.logger.info(f"Removing {tmp}, left by an interrupted checkpoint write")
            try:
                os.remove(tmp)
            except OSError:
                pass

    # ------------------------------------------------------------------ loading
    def load(self, path, *args, **kwargs):
        if not path and self.min_loaded_fraction is not None:
            raise CheckpointError("no weights given (MODEL.WEIGHTS is empty): the model would "
                                  "keep its random initial weights")
        self._loading = path
        try:
            return super().load(path, *args, **kwargs)
        finally:
            self._loading = None

    def _load_file(self, filename: str):
        if self._verified is not None and self._verified[0] == filename:
            data, self._verified = self._verified[1], None
            return data
        try:
            loaded = super()._load_file(filename)
        except Exception as e:  # noqa: BLE001 (torch.load raises many types for a bad file)
            if isinstance(e, OSError) and not os.path.exists(filename):
                raise
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise CheckpointError(
                f"{filename} is not a checkpoint readable by torch.load "
                f"({type(e).__name__}{': ' + msg[:300] if msg else ''})"
            ) from e
        if not isinstance(loaded, Mapping) or not isinstance(loaded.get("model"), Mapping):
            found = loaded.get("model") if isinstance(loaded, Mapping) else loaded
            raise CheckpointError(
                f"{filename} holds {_describe(found)}, not a checkpoint "
                "({'model': {name: tensor}} or {name: tensor})"
            )
        for key, value in loaded["model"].items():
            if not isinstance(value, (torch.Tensor, np.ndarray)):
                raise CheckpointError(
                    f"{filename}: entry {key!r} of the model state is {_describe(value)}, "
                    "not a tensor; the file is not a model checkpoint"
                )
        return loaded

    def _load_model(self, checkpoint):
        state = checkpoint["model"]
        if not checkpoint.get("matching_heuristics", False):
            self._convert_ndarray_to_tensor(state)
            _strip_prefix_if_present(state, "module.")
            for prefix, module in self.model.named_modules():
                fit = getattr(module, "fit_checkpoint_state", None)
                if callable(fit):
                    fit(state, prefix + "." if prefix else "")
        incompatible = super()._load_model(checkpoint)
        if self.min_loaded_fraction is not None and incompatible is not None:
            self._check_loaded_fraction(incompatible)
        return incompatible

    def _check_loaded_fraction(self, incompatible) -> None:
        not_loaded = set(incompatible.missing_keys)
        not_loaded.update(k for k, *_ in incompatible.incorrect_shapes)
        names = [n for n, _ in self.model.named_parameters()]
        loaded = sum(n not in not_loaded for n in names)
        if names and loaded < self.min_loaded_fraction * len(names):
            raise CheckpointError(
                f"{getattr(self, '_loading', None) or 'the checkpoint'} fills {loaded} of the "
                f"model's {len(names)} parameter tensors "
                f"(needed: {self.min_loaded_fraction:.0%}); "
                f"{len(incompatible.missing_keys)} missing, "
                f"{len(incompatible.incorrect_shapes)} of another shape, "
                f"{len(incompatible.unexpected_keys)} checkpoint entries unused. Is MODEL.WEIGHTS "
                "a checkpoint of this config's model?"
            )
