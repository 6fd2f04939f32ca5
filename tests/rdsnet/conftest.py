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
