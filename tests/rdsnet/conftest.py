"""Make the shared helper module `_tiny.py` importable as `rdsnet_tiny` under importlib mode."""
import importlib.util
import os
import sys

if "rdsnet_tiny" not in sys.modules:
    _spec = importlib.util.spec_from_file_location(
        "rdsnet_tiny", os.path.join(os.path.dirname(__file__), "_tiny.py")
    )
    _mod = importlib.util.module_from_spec(_spec)
    sys.modules["rdsnet_tiny"] = _mod
    _spec.loader.exec_module(_mod)


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _single_intra_op_thread():
    """Run this directory's tests with one intra-op thread (restored afterwards).

    On the shared 2-core CI machine OpenMP threads of concurrent processes spin against each
    other: a tiny conv is ~10x slower with 2 threads than with 1 under load.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
