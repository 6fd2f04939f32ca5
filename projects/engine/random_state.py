"""The global random states of one process (torch CPU and CUDA, NumPy, Python `random`) as
checkpoint-friendly values (tensors, lists and numbers only, so `torch.load` with
``weights_only=True`` reads them back)."""
import contextlib
import random

import numpy as np
import torch

__all__ = ["capture_random_states", "restore_random_states", "preserved_random_states"]


def capture_random_states() -> dict:
    """The current global random states of this process."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "state": list(py_state), "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def restore_random_states(states: dict) -> None:
    """Set the global random states to ``states`` (from `capture_random_states`)."""
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    p = states["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


@contextlib.contextmanager
def preserved_random_states():
    """Run a block without changing the global random states seen after it."""
    states = capture_random_states()
    try:
        yield
    finally:
        restore_random_states(states)
