"""The Detectron2 installer: its compatibility fixes, the `_C` stand-in, installing from a local
source tree, and what the installed Detectron2 offers (compiled ops, or the fallback's clear
errors)."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from projects.testing import repo_root

from .conftest import COMPILED_DETECTRON2

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


def _rotated_nms_case():
    # (cx, cy, w, h, angle in degrees): 10x2 boxes. Box 1 is box 0 turned by 90 degrees
    # (overlap 2x2: IoU 4/36), box 2 is box 0 shifted by 1 px along its long side (overlap 9x2:
    # IoU 18/22), box 3 is far away. At IoU threshold 0.5, NMS keeps 0 (best score), suppresses
    # 2 (IoU 0.82 with 0) and keeps 1 (IoU 0.11) and 3, in decreasing score order.
    boxes = torch.tensor([[20.0, 20.0, 10.0, 2.0, 0.0], [20.0, 20.0, 10.0, 2.0, 90.0],
                          [21.0, 20.0, 10.0, 2.0, 0.0], [80.0, 80.0, 4.0, 4.0, 30.0]])
    scores = torch.tensor([0.9, 0.7, 0.8, 0.6])
    return boxes, scores, [0, 1, 3]


def test_rotated_ops_are_compiled_or_raise_a_clear_error():
    from detectron2 import _C
    from detectron2.layers import nms_rotated
    from detectron2.layers.rotated_boxes import pairwise_iou_rotated

    boxes, scores, keep = _rotated_nms_case()
    if COMPILED_DETECTRON2:
        assert not getattr(_C, "IS_PURE_PYTHON_STANDIN", False)
        assert nms_rotated(boxes, scores, 0.5).tolist() == keep
        assert torch.ops.detectron2.nms_rotated(boxes, scores, 0.5).tolist() == keep
        iou = pairwise_iou_rotated(boxes[:1], boxes[:3])
        assert torch.allclose(iou, torch.tensor([[1.0, 1 / 9, 9 / 11]]), atol=1e-4)
        return
    assert _C.IS_PURE_PYTHON_STANDIN
    calls = {
        "nms_rotated": lambda: nms_rotated(boxes, scores, 0.5),  # torch.ops.detectron2
        "box_iou_rotated": lambda: pairwise_iou_rotated(boxes, boxes),
        "roi_align_rotated_forward": lambda: torch.ops.detectron2.roi_align_rotated_forward(
            torch.zeros(1, 1, 8, 8), torch.zeros(1, 6), 1.0, 2, 2, 0),
        "deform_conv_forward": lambda: _C.deform_conv_forward(),
        "COCOevalEvaluateImages": lambda: _C.COCOevalEvaluateImages(),
        "COCOevalAccumulate": lambda: _C.COCOevalAccumulate(),
    }
    for op, call in calls.items():
        with pytest.raises(NotImplementedError, match=op) as err:
            call()
        assert "pip install" in str(err.value)


def test_detectron2_export_model_zoo_analysis_testing_import():
    import detectron2.export
    import detectron2.utils.analysis

    assert detectron2.utils.analysis.FlopCountAnalysis and detectron2.export.TracingAdapter
    if COMPILED_DETECTRON2 and importlib.util.find_spec("pkg_resources") is None:
        # Detectron2 main's model zoo still imports pkg_resources (setuptools < 81 has it)
        with pytest.raises(ModuleNotFoundError, match="pkg_resources"):
            import detectron2.model_zoo  # noqa: F401
        return
    import detectron2.utils.testing
    from detectron2 import model_zoo

    path = model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml")
    assert path.endswith(os.path.join("configs", "COCO-InstanceSegmentation",
                                      "mask_rcnn_R_50_FPN_1x.yaml")) and os.path.isfile(path)
    cfg = model_zoo.get_config("COCO-Detection/retinanet_R_50_FPN_1x.yaml")
    assert cfg.MODEL.META_ARCHITECTURE == "RetinaNet"
    assert detectron2.utils.testing.get_model_no_weights  # imports model_zoo


def test_fallback_file_fixes_make_caffe2_optional_and_drop_pkg_resources(tmp_path):
    # The v0.6 lines the fixes rewrite, as in the pb1-detectron2 sdist.
    zoo = tmp_path / "detectron2" / "model_zoo"
    export = tmp_path / "detectron2" / "export"
    zoo.mkdir(parents=True)
    export.mkdir(parents=True)
    (zoo / "model_zoo.py").write_text(
        "import os\nfrom typing import Optional\nimport pkg_resources\nimport torch\n\n"
        "def get_config_file(config_path):\n"
        "    cfg_file = pkg_resources.resource_filename(\n"
        "        \"detectron2.model_zoo\", os.path.join(\"configs\", config_path)\n    )\n"
        "    return cfg_file\n")
    (export / "__init__.py").write_text(
        "# -*- coding: utf-8 -*-\n\nfrom .api import *\nfrom .flatten import TracingAdapter\n")
    installer.patch_files(str(tmp_path))
    zoo_text = (zoo / "model_zoo.py").read_text()
    assert "pkg_resources" not in zoo_text
    namespace = {"__file__": str(zoo / "model_zoo.py")}
    exec(compile(zoo_text, "model_zoo.py", "exec"), namespace)
    assert namespace["get_config_file"]("A/b.yaml") == str(zoo / "configs" / "A" / "b.yaml")
    export_text = (export / "__init__.py").read_text()
    assert "\nfrom .api import *" not in export_text
    assert "except ImportError:" in export_text and "    from .api import *" in export_text
    assert export_text.endswith("from .flatten import TracingAdapter\n")
    with pytest.raises(SystemExit, match="model_zoo.py: expected one match"):
        installer.patch_files(str(tmp_path))  # the v0.6 text is gone: a changed tree is loud


def test_source_tree_is_checked_and_built_with_its_compiled_ops(tmp_path, monkeypatch):
    tree = tmp_path / "detectron2-fork"
    tree.mkdir()
    monkeypatch.setenv(installer.SOURCE_ENV, str(tree))
    # the environment variable is the default of --source; a tree without the C++ sources
    # is refused before anything is installed, naming the path and the missing file
    with pytest.raises(SystemExit, match=r"detectron2-fork.*setup\.py is missing"):
        installer.main([])
    (tree / "setup.py").write_text("")
    with pytest.raises(SystemExit, match=r"detectron2-fork.*vision\.cpp is missing"):
        installer.main(["--source", str(tree)])
    csrc = tree / "detectron2" / "layers" / "csrc"
    csrc.mkdir(parents=True)
    (csrc / "vision.cpp").write_text("")
    assert installer.check_source_tree(str(tree)) == str(tree)
    assert installer.source_install_args(str(tree)) == [
        "install", "--no-build-isolation", str(tree)]
    assert installer.source_install_args(str(tree), editable=True) == [
        "install", "--no-build-isolation", "-e", str(tree)]


def test_project_never_imports_detectron2_model_zoo():
    # detectron2.model_zoo needs pkg_resources, which recent setuptools removed
    import subprocess
    import sys

    code = ("import sys, projects, projects.engine, projects.testing; "
            "print('detectron2.model_zoo' in sys.modules, 'pkg_resources' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
