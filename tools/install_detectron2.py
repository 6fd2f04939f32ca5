#!/usr/bin/env python
"""Install Detectron2 into the current interpreter's environment.

This is the project's only compatibility shim for Detectron2; runtime code never patches
Detectron2. Order of attempts:

1. A local Detectron2 source tree, when given (``--source PATH`` or the ``DETECTRON2_SOURCE``
   environment variable; for machines behind a proxy or a fork): built with its compiled ops
   (``pip install --no-build-isolation PATH``, editable with ``--editable``) and checked to load
   them. Detectron2's own ``setup.py`` builds the CPU ops with the system C++ compiler, and
   the CUDA ops too where ``nvcc`` and a GPU (or ``FORCE_CUDA=1``) are present.
2. Detectron2 already importable -> nothing to do (so ``make setup`` is idempotent), unless it
   is an older build of this project's fallback (step 4), which is replaced.
3. The official GitHub source (what a user with internet access gets; builds the compiled
   ops): ``pip install --no-build-isolation git+https://github.com/facebookresearch/detectron2.git``.
4. Fallback: the ``pb1-detectron2==0.6`` source distribution on PyPI, which is Detectron2
   v0.6's Python tree without ``detectron2/layers/csrc``. We unpack it, apply the small fixes
   needed for current Pillow (``Image.LINEAR``/``ANTIALIAS`` were removed), NumPy
   (``np.bool``/``np.int``/``np.float``/``np.str``/``np.object`` aliases were removed; NumPy 2
   rejects ``np.array(..., copy=False)``) and setuptools (``pkg_resources`` was removed: the
   model zoo finds its configs next to its module), make ``detectron2.export``'s caffe2 part
   optional as Detectron2 main does, add a pure-Python ``detectron2._C`` stand-in whose
   compiled ops (the ``_C`` functions and the ``torch.ops.detectron2`` operators) raise
   ``NotImplementedError`` naming the op, and install the tree with pip.

Usage: ``python tools/install_detectron2.py [--source PATH [--editable] [--force]]
[--force-fallback]``.
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
SOURCE_ENV = "DETECTRON2_SOURCE"
# The version the fallback tree is installed under; bump it when the fixes below change, so
# that `make setup` replaces an older fallback.
FALLBACK_VERSION = "0.6+pyfallback2"

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
# The compiled build's pybind11 functions (``detectron2._C.<name>``) ...
_MISSING_OPS = (
    "deform_conv_forward", "deform_conv_backward_input", "deform_conv_backward_filter",
    "modulated_deform_conv_forward", "modulated_deform_conv_backward",
    "COCOevalAccumulate", "COCOevalEvaluateImages", "InstanceAnnotation", "ImageEvaluation",
    # v0.6's Python calls these through ``_C`` too; the compiled build registers them below.
    "roi_align_rotated_forward", "roi_align_rotated_backward", "box_iou_rotated",
    "nms_rotated",
)
# ... and its TORCH_LIBRARY(detectron2) operators (``torch.ops.detectron2.<name>``), with the
# compiled schemas, so that e.g. ``detectron2.layers.nms_rotated`` raises the same clear error.
_TORCH_OPS = {
    "nms_rotated": "nms_rotated(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "box_iou_rotated": "box_iou_rotated(Tensor boxes1, Tensor boxes2) -> Tensor",
    "roi_align_rotated_forward": "roi_align_rotated_forward(Tensor input, Tensor rois, "
    "float spatial_scale, int pooled_height, int pooled_width, int sampling_ratio) -> Tensor",
    "roi_align_rotated_backward": "roi_align_rotated_backward(Tensor grad, Tensor rois, "
    "float spatial_scale, int pooled_height, int pooled_width, int batch_size, int channels, "
    "int height, int width, int sampling_ratio) -> Tensor",
}
IS_PURE_PYTHON_STANDIN = True


def _missing(name):
    def op(*args, **kwargs):
        raise NotImplementedError(_HINT.format(name=name))

    op.__name__ = name
    return op


for _name in _MISSING_OPS:
    globals()[_name] = _missing(_name)


def _register_torch_ops():
    import torch

    missing = [n for n in _TORCH_OPS if not hasattr(torch.ops.detectron2, n)]
    if not missing:
        return None
    lib = torch.library.Library("detectron2", "FRAGMENT")
    for name in missing:
        lib.define(_TORCH_OPS[name])
        lib.impl(name, _missing(name), "CompositeExplicitAutograd")
    return lib


_TORCH_LIBRARY = _register_torch_ops()  # kept alive: the registrations last as long as it


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

# (file, regex, replacement): fixes of one module each; every regex must match once.
FILE_FIXES = [
    # setuptools >= 81 has no pkg_resources: the configs are package data next to the module.
    ("detectron2/model_zoo/model_zoo.py", re.compile(r"^import pkg_resources\n", re.M), ""),
    ("detectron2/model_zoo/model_zoo.py",
     re.compile(r"pkg_resources\.resource_filename\(\s*\"detectron2\.model_zoo\",\s*"
                r"os\.path\.join\(\"configs\", config_path\)\s*\)"),
     'os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", config_path)'),
    # caffe2 left PyTorch: its export API is optional, as on Detectron2 main.
    ("detectron2/export/__init__.py", re.compile(r"^from \.api import \*\n", re.M),
     "try:\n    from caffe2.proto import caffe2_pb2 as _tmp  # noqa: F401\n"
     "    from caffe2.python import core  # noqa: F401\n"
     "except ImportError:  # caffe2 is optional\n    pass\nelse:\n"
     "    from .api import *\n"),
]

FALLBACK_SETUP = f'''from setuptools import find_packages, setup

setup(
    name="detectron2",
    version="{FALLBACK_VERSION}",
    description="Detectron2 v0.6 Python tree (pb1-detectron2 sdist) with compatibility fixes "
    "and a pure-Python _C stand-in",
    packages=find_packages(include=["detectron2", "detectron2.*"]),
    package_data={{"detectron2": ["model_zoo/configs/**/*.yaml", "model_zoo/configs/**/*.py"]}},
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


def installed_build():
    """"compiled", "fallback" (this version's), "old-fallback", or None (not importable)."""
    code = ("import importlib.metadata as m, detectron2\n"
            "from detectron2 import _C\n"
            "print(m.version('detectron2') if getattr(_C, 'IS_PURE_PYTHON_STANDIN', False) "
            "else 'compiled')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0 or not detectron2_importable():
        return None
    version = out.stdout.strip()
    if version == "compiled":
        return "compiled"
    return "fallback" if version == FALLBACK_VERSION else "old-fallback"


def check_source_tree(path):
    """The absolute path of a Detectron2 source tree with its compiled ops' sources, or a clear
    error naming ``path``."""
    root = os.path.abspath(os.path.expanduser(path))
    for rel in ("setup.py", os.path.join("detectron2", "layers", "csrc", "vision.cpp")):
        if not os.path.isfile(os.path.join(root, rel)):
            raise SystemExit(
                f"{path!r} is not a Detectron2 source tree with its compiled ops: {rel} is "
                "missing (expected a checkout of https://github.com/facebookresearch/detectron2)")
    return root


def source_install_args(root, editable=False):
    """pip arguments that build and install the Detectron2 source tree ``root``."""
    return ["install", "--no-build-isolation", *(["-e"] if editable else []), root]


def install_from_source(path, editable=False):
    root = check_source_tree(path)
    log(f"building Detectron2 and its compiled ops from {root} (several minutes on CPU)")
    if not pip(*source_install_args(root, editable)):
        raise SystemExit(f"pip could not build Detectron2 from {root}")
    if installed_build() != "compiled":
        raise SystemExit(f"Detectron2 built from {root} does not load its compiled ops "
                         "(detectron2._C)")


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


def patch_files(root):
    """Apply FILE_FIXES in place; a fix that does not match is an error (tree changed)."""
    for rel, pattern, repl in FILE_FIXES:
        path = os.path.join(root, rel)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        new, n = pattern.subn(repl, text)
        if n != 1:
            raise SystemExit(f"{rel}: expected one match of {pattern.pattern!r}, found {n}")
        with open(path, "w", encoding="utf-8") as f:
            f.write(new)


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
        log(f"patched {patch_tree(build)} files for current Pillow/NumPy/setuptools")
        patch_files(build)
        with open(os.path.join(build, "detectron2", "_C.py"), "w") as f:
            f.write(STANDIN_C)
        with open(os.path.join(build, "setup.py"), "w") as f:
            f.write(FALLBACK_SETUP)
        if not pip("install", "--no-deps", "--no-build-isolation", build):
            raise SystemExit("pip could not install the patched Detectron2 tree")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=os.environ.get(SOURCE_ENV) or None, metavar="PATH",
                        help="build Detectron2 and its compiled ops from this local source tree "
                             f"(default: ${SOURCE_ENV})")
    parser.add_argument("--editable", action="store_true",
                        help="with --source: install it in editable mode (pip -e)")
    parser.add_argument("--force", action="store_true",
                        help="with --source: rebuild even if a compiled Detectron2 is installed")
    parser.add_argument("--force-fallback", action="store_true",
                        help="skip the GitHub attempt and install the patched v0.6 tree")
    args = parser.parse_args(argv)
    if args.source and args.force_fallback:
        parser.error("--source and --force-fallback exclude each other")
    root = check_source_tree(args.source) if args.source else None  # fail before anything
    build = installed_build()
    if args.source:
        if build == "compiled" and not args.force:
            log("a compiled Detectron2 is already installed (rebuild with --force)")
            return
    elif build == "old-fallback":
        log("replacing an older build of the pure-Python fallback")
    elif build is not None:
        log("detectron2 already installed")
        return
    if importlib.util.find_spec("torch") is None:
        raise SystemExit("install torch and torchvision first (see the Makefile's setup target)")
    if args.source:
        install_from_source(root, args.editable)
        log(f"installed Detectron2 with its compiled ops from {root}")
    elif build != "old-fallback" and not args.force_fallback and try_github():
        log("installed Detectron2 from GitHub")
    else:
        log(f"GitHub source unavailable; falling back to {FALLBACK_SPEC} (pure Python)")
        install_fallback()
    if not detectron2_importable():
        raise SystemExit("detectron2 still does not import after installation")
    log("detectron2 ready")


if __name__ == "__main__":
    main()
