#!/usr/bin/env python
"""Install Detectron2 into the current interpreter's environment.

This is the project's only compatibility shim for Detectron2; runtime code never patches
Detectron2. Order of attempts:

1. Detectron2 already importable -> nothing to do (so ``make setup`` is idempotent).
2. The official GitHub source (what a user with internet access gets; builds the compiled
   ops when a compiler/CUDA is available):
   ``pip install --no-build-isolation git+https://github.com/facebookresearch/detectron2.git``.
3. Fallback: the ``pb1-detectron2==0.6`` source distribution on PyPI, which is Detectron2
   v0.6's Python tree without ``detectron2/layers/csrc``. We unpack it, apply the small fixes
   needed for current Pillow (``Image.LINEAR``/``ANTIALIAS`` were removed) and NumPy
   (``np.bool``/``np.int``/``np.float``/``np.str``/``np.object`` aliases were removed; NumPy 2
   rejects ``np.array(..., copy=False)``), add a pure-Python ``detectron2._C`` stand-in whose
   compiled ops raise ``NotImplementedError`` naming the op, and install the tree with pip.

Usage: ``python tools/install_detectron2.py [--force-fallback]``.
"""
import argparse
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile

GITHUB_SPEC = "git+https://github.com/facebookresearch/detectron2.git"
FALLBACK_SPEC = "pb1-detectron2==0.6"
GITHUB_TIMEOUT_S = 900

# Pure-Python stand-in for the compiled extension. Every attribute access for an op raises
# a NotImplementedError that names the op and says how to get the compiled build.
STANDIN_C = '''"""Pure-Python stand-in for Detectron2's compiled ``_C`` extension.

Installed by this project's ``tools/install_detectron2.py`` because the compiled ops could not
be built here. Everything the R-CNN, RetinaNet and evaluation paths need works through
torchvision ops; the ops below exist only in the compiled build.
"""

_HINT = (
    "detectron2._C.{name} is a compiled op and this Detectron2 was installed without its "
    "compiled extension (pure-Python fallback). Install Detectron2 from source to get it: "
    "pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git'"
    " (see https://detectron2.readthedocs.io/en/latest/tutorials/install.html)."
)
_MISSING_OPS = (
    "deform_conv_forward", "deform_conv_backward_input", "deform_conv_backward_filter",
    "modulated_deform_conv_forward", "modulated_deform_conv_backward",
    "roi_align_rotated_forward", "roi_align_rotated_backward", "box_iou_rotated",
    "nms_rotated", "COCOevalMaskApi", "InstanceAnnotation", "ImageEvaluation",
)
IS_PURE_PYTHON_STANDIN = True


def _missing(name):
    def op(*args, **kwargs):
        raise NotImplementedError(_HINT.format(name=name))

    op.__name__ = name
    return op


for _name in _MISSING_OPS:
    globals()[_name] = _missing(_name)


def get_compiler_version():
    return "none (pure-Python detectron2._C stand-in)"


def get_cuda_version():
    return "none (pure-Python detectron2._C stand-in)"


def has_cuda():
    return False


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _missing(name)
'''

# (regex, replacement) applied to every .py file of the v0.6 tree.
COMPAT_FIXES = [
    (re.compile(r"\bImage\.LINEAR\b"), "Image.BILINEAR"),
    (re.compile(r"\bImage\.ANTIALIAS\b"), "Image.LANCZOS"),
    (re.compile(r"\bnp\.(bool|int|float|str|object)\b(?![\w.])"), r"\1"),
    (re.compile(r"np\.array\(mask, copy=False\)"), "np.asarray(mask)"),
]

FALLBACK_SETUP = '''from setuptools import find_packages, setup

setup(
    name="detectron2",
    version="0.6+pyfallback",
    description="Detectron2 v0.6 Python tree (pb1-detectron2 sdist) with compatibility fixes "
    "and a pure-Python _C stand-in",
    packages=find_packages(include=["detectron2", "detectron2.*"]),
    package_data={"detectron2": ["model_zoo/configs/**/*.yaml", "model_zoo/configs/**/*.py"]},
    python_requires=">=3.7",
)
'''


def log(msg):
    print(f"[install_detectron2] {msg}", flush=True)


def pip(*args, timeout=None):
    cmd = [sys.executable, "-m", "pip", *args]
    log(" ".join(cmd))
    return subprocess.run(cmd, timeout=timeout).returncode == 0


def detectron2_importable():
    # A subprocess, so a half-installed tree in this process does not count.
    code = "import detectron2, detectron2.modeling, detectron2.data; print(detectron2.__file__)"
    return subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def try_github():
    try:
        return pip("install", "--no-build-isolation", GITHUB_SPEC, timeout=GITHUB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return False


def patch_tree(root):
    """Apply COMPAT_FIXES in place; return the number of files changed."""
    changed = 0
    for path in glob.glob(os.path.join(root, "detectron2", "**", "*.py"), recursive=True):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        new = text
        for pattern, repl in COMPAT_FIXES:
            new = pattern.sub(repl, new)
        if new != text:
            with open(path, "w", encoding="utf-8") as f:
                f.write(new)
            changed += 1
    return changed


def install_fallback():
    with tempfile.TemporaryDirectory() as tmp:
        # pip download runs the sdist's setup.py (which imports torch): no build isolation.
        ok = pip("download", FALLBACK_SPEC, "--no-deps", "--no-binary", ":all:",
                 "--no-build-isolation", "-d", tmp)
        archives = glob.glob(os.path.join(tmp, "*.tar.gz"))
        if not ok or not archives:
            raise SystemExit(f"could not download {FALLBACK_SPEC} from PyPI")
        with tarfile.open(archives[0]) as tar:
            tar.extractall(tmp, filter="data")
        src = next(p for p in glob.glob(os.path.join(tmp, "*")) if os.path.isdir(p))
        build = os.path.join(tmp, "build_tree")
        os.makedirs(build)
        shutil.copytree(os.path.join(src, "detectron2"), os.path.join(build, "detectron2"))
        log(f"patched {patch_tree(build)} files for current Pillow/NumPy")
        with open(os.path.join(build, "detectron2", "_C.py"), "w") as f:
            f.write(STANDIN_C)
        with open(os.path.join(build, "setup.py"), "w") as f:
            f.write(FALLBACK_SETUP)
        if not pip("install", "--no-deps", "--no-build-isolation", build):
            raise SystemExit("pip could not install the patched Detectron2 tree")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force-fallback", action="store_true",
                        help="skip the GitHub attempt and install the patched v0.6 tree")
    args = parser.parse_args()
    if detectron2_importable():
        log("detectron2 already installed")
        return
    if importlib.util.find_spec("torch") is None:
        raise SystemExit("install torch and torchvision first (see the Makefile's setup target)")
    if not args.force_fallback and try_github():
        log("installed Detectron2 from GitHub")
    else:
        log(f"GitHub source unavailable; falling back to {FALLBACK_SPEC} (pure Python)")
        install_fallback()
    if not detectron2_importable():
        raise SystemExit("detectron2 still does not import after installation")
    log("detectron2 ready")


if __name__ == "__main__":
    main()
