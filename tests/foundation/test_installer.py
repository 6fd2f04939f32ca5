"""The Detectron2 installer's compatibility fixes and the `_C` stand-in."""
import importlib.util
import os

import pytest

from projects.testing import repo_root

spec = importlib.util.spec_from_file_location(
    "install_detectron2", os.path.join(repo_root(), "tools", "install_detectron2.py"))
installer = importlib.util.module_from_spec(spec)
spec.loader.exec_module(installer)


def _fix(text):
    for pattern, repl in installer.COMPAT_FIXES:
        text = pattern.sub(repl, text)
    return text


def test_compat_fixes_rewrite_removed_aliases_only():
    src = ("def f(interp=Image.LINEAR): x.astype(np.bool); np.zeros(3, dtype=np.int)\n"
           "y = np.float(2); np.int64(1); np.float32; np.bool_; Image.ANTIALIAS\n"
           "mask = np.array(mask, copy=False)\n")
    out = _fix(src)
    assert "Image.BILINEAR" in out and "Image.LANCZOS" in out
    assert "astype(bool)" in out and "dtype=int)" in out and "float(2)" in out
    assert "np.int64(1)" in out and "np.float32" in out and "np.bool_" in out
    assert "np.asarray(mask)" in out


def test_stand_in_ops_raise_a_clear_error():
    from detectron2 import _C

    if not getattr(_C, "IS_PURE_PYTHON_STANDIN", False):
        assert hasattr(_C, "nms_rotated")  # compiled build: the real op is there
        return
    for op in ("nms_rotated", "deform_conv_forward", "COCOevalMaskApi"):
        with pytest.raises(NotImplementedError, match=op) as err:
            getattr(_C, op)()
        assert "pip install" in str(err.value)


def test_project_never_imports_detectron2_model_zoo():
    # detectron2.model_zoo needs pkg_resources, which recent setuptools removed
    import subprocess
    import sys

    code = ("import sys, projects, projects.engine, projects.testing; "
            "print('detectron2.model_zoo' in sys.modules, 'pkg_resources' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
