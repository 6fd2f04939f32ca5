"""Export any method's model to TorchScript and ONNX, the way Detectron2 exports its R-CNNs.

Detectron2's `tools/deploy/export_model.py` flattens a model's list-of-dict inputs and
`Instances` outputs into tuples of tensors with `TracingAdapter`, then traces it with
`torch.jit.trace` (TorchScript) or exports the same trace with `torch.onnx.export` (ONNX). This
module does the same for all five methods:

    adapter = tracing_adapter(model, image)           # model.eval(), image (3, H, W)
    ts = torch.jit.trace(adapter, (image,))            # or: trace(model, image)
    export_onnx(model, image, "model.onnx")            # H and W are dynamic axes
    instances = adapter.outputs_schema(ts(other_image))[0]["instances"]

R-CNN models (`GeneralizedRCNN`: Res2Net, Dynamic R-CNN, TSD, Decoupled R-CNN) are traced
through ``model.inference(inputs, do_postprocess=False)`` as Detectron2 does: boxes at the
network input size and, with masks, the (R, 1, M, M) mask probabilities before pasting.
RDSNet is traced through its forward: boxes and full-image masks at the input size.

A trace records only tensor operations; Python numbers derived from shapes would be frozen at
the traced size. The methods therefore take every size from tensors, so one trace serves inputs
of any size and aspect ratio (tests: ``tests/tools/test_export.py``). Soft-NMS (Decoupled
R-CNN's multi-scale configs) is a data-dependent loop: a trace keeps it as a TorchScript
function, ONNX cannot express it and `check_exportable` refuses it with `ExportError`.
"""
import importlib
import os
import sys
import types

import torch
from detectron2.modeling import GeneralizedRCNN

__all__ = [
    "ExportError",
    "EXPORT_FORMATS",
    "ONNX_OPSET",
    "tracing_adapter_class",
    "tracing_adapter",
    "trace",
    "export_onnx",
    "check_exportable",
    "uses_soft_nms",
]

EXPORT_FORMATS = ("torchscript", "onnx")
# torchvision's RoIAlign with aligned=True (Detectron2's ROIAlignV2) needs opset >= 16.
ONNX_OPSET = 17


class ExportError(RuntimeError):
    """A model / setting that cannot be exported in the requested format."""


def tracing_adapter_class():
    """Detectron2's `TracingAdapter` (``detectron2/export/flatten.py``).

    Detectron2 builds without Caffe2 support fail to import the `detectron2.export` package
    (its ``__init__`` imports the Caffe2 exporter); `flatten.py` itself needs no Caffe2, so it
    is then loaded on its own (the package stays unimported, as before).
    """
    try:
        from detectron2.export import TracingAdapter

        return TracingAdapter
    except ImportError as e:
        cached = sys.modules.get("detectron2.export.flatten")
        if cached is not None:
            return cached.TracingAdapter
        import detectron2

        folder = os.path.join(os.path.dirname(detectron2.__file__), "export")
        if not os.path.isfile(os.path.join(folder, "flatten.py")):
            raise ExportError(f"this Detectron2 has no detectron2/export/flatten.py ({e})") from e
        package = types.ModuleType("detectron2.export")
        package.__path__ = [folder]
        sys.modules["detectron2.export"] = package
        try:
            flatten = importlib.import_module("detectron2.export.flatten")
        finally:
            del sys.modules["detectron2.export"]
        return flatten.TracingAdapter


def _rcnn_inference(model, inputs):
    # Detectron2's export_model.py: no final resize, R-CNN masks stay (R, 1, M, M) ROI masks.
    return [{"instances": model.inference(inputs, do_postprocess=False)[0]}]


def uses_soft_nms(model) -> bool:
    """Whether ``model`` post-processes with soft-NMS (Decoupled R-CNN ``TEST_NMS_TYPE``)."""
    for module in model.modules():
        nms_type = getattr(module, "test_nms_type", None)
        if isinstance(nms_type, str) and nms_type.startswith("soft"):
            return True
    return False


def check_exportable(model, fmt: str):
    """Raise `ExportError` when ``model`` cannot be exported to ``fmt`` (``EXPORT_FORMATS``)."""
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"export format {fmt!r} is not one of {EXPORT_FORMATS}")
    if fmt == "onnx" and uses_soft_nms(model):
        raise ExportError(
            "soft-NMS (MODEL.DECOUPLED_RCNN.TEST_NMS_TYPE: soft_nms_linear) is a data-dependent "
            "loop that ONNX export cannot express; export TorchScript (--format torchscript), "
            "or set MODEL.DECOUPLED_RCNN.TEST_NMS_TYPE nms to export ONNX with hard NMS"
        )


def tracing_adapter(model, image: torch.Tensor):
    """`TracingAdapter` of ``model`` (put in eval mode) for one (3, H, W) ``image``."""
    if model.training:
        model.eval()
    inference = _rcnn_inference if isinstance(model, GeneralizedRCNN) else None
    # eval() on the adapter too: exporters restore the wrapper's mode recursively afterwards
    return tracing_adapter_class()(model, [{"image": image}], inference).eval()


def trace(model, image: torch.Tensor, check_exportable_as: str = "torchscript"):
    """TorchScript trace of ``model`` at ``image``; returns ``(traced, adapter)``.

    ``adapter.outputs_schema(traced(img))`` rebuilds ``[{"instances": Instances}]``.
    """
    check_exportable(model, check_exportable_as)
    adapter = tracing_adapter(model, image)
    with torch.no_grad():
        traced = torch.jit.trace(adapter, (image,), check_trace=False)
    return traced, adapter


def export_onnx(model, image: torch.Tensor, f, opset_version: int = ONNX_OPSET):
    """Export ``model`` traced at ``image`` to ONNX file ``f`` (input ``image``, dynamic H, W).

    Uses PyTorch's TorchScript-based exporter (the one Detectron2 uses). Returns the adapter,
    whose ``outputs_schema`` rebuilds `Instances` from the ONNX outputs (in order).
    """
    check_exportable(model, "onnx")
    adapter = tracing_adapter(model, image)
    with torch.no_grad():
        outputs = adapter(image)
    output_names = [f"output{i}" for i in range(len(outputs))]
    dynamic_axes = {"image": {1: "height", 2: "width"}}
    for name, out in zip(output_names, outputs):
        dynamic_axes[name] = {d: f"{name}_dim{d}" for d in range(out.dim())}
    kwargs = {"dynamo": False} if _has_dynamo_flag() else {}
    with torch.no_grad():
        torch.onnx.export(
            adapter,
            (image,),
            f,
            input_names=["image"],
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            opset_version=opset_version,
            **kwargs,
        )
    return adapter


def _has_dynamo_flag() -> bool:
    import inspect

    try:
        return "dynamo" in inspect.signature(torch.onnx.export).parameters
    except (TypeError, ValueError):
        return False
