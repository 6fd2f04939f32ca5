"""Make the shared helper modules `_tiny.py` and `_reference.py` importable as `tsd_tiny` and
`tsd_reference` under importlib mode."""
import importlib.util
import os
import sys

for _name, _file in (("tsd_tiny", "_tiny.py"), ("tsd_reference", "_reference.py")):
    if _name not in sys.modules:
        _spec = importlib.util.spec_from_file_location(
            _name, os.path.join(os.path.dirname(__file__), _file)
        )
        _mod = importlib.util.module_from_spec(_spec)
        sys.modules[_name] = _mod
        _spec.loader.exec_module(_mod)
