#!/usr/bin/env python
"""Export a model of any of the five methods to TorchScript or ONNX (Detectron2-style tracing).

Examples:
    python tools/export_model.py --config-file configs/tsd/tsd_faster_rcnn_R_50_FPN_1x.yaml \\
        --format torchscript --output exported/ --sample-image photo.jpg --verify \\
        --opts MODEL.WEIGHTS output/model_final.pth MODEL.DEVICE cpu
    python tools/export_model.py --config-file configs/rdsnet/rdsnet_refine_R_50_FPN_1x.yaml \\
        --format onnx --output exported/ --verify --opts MODEL.WEIGHTS rdsnet.pth

As Detectron2's `tools/deploy/export_model.py` (``--export-method tracing``): the model is wrapped
in Detectron2's `TracingAdapter` and traced on one image (``--sample-image``, resized with
INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST, else the first image of DATASETS.TEST[0]); the input is one
(3, H, W) float image in INPUT.FORMAT, any H and W. Writes ``model.ts`` (load with
`torch.jit.load`) or ``model.onnx`` (input ``image``, dynamic H and W), and ``schema.txt`` (how
the flat outputs rebuild `Instances`). R-CNN models (Res2Net, Dynamic R-CNN, TSD, Decoupled R-CNN)
return boxes, classes, scores (and (R, 1, M, M) mask probabilities) at the input size, before
the final resize, as Detectron2's export does; RDSNet returns boxes, classes, scores and
full-image boolean masks at the input size.

``--verify`` runs the exported model (TorchScript, or ONNX in onnxruntime) and the eager model
on the sample image and on two rescaled copies of other aspect ratios, and fails if they differ.
Scripting (``--export-method scripting``) is not offered: see the README section "Export".
"""
import argparse
import logging
import os
import sys

import torch

from projects.tools_common import ToolError, add_config_args, build_model, setup_cfg

logger = logging.getLogger("tools.export_model")


def get_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    parser.add_argument("--format", choices=["torchscript", "onnx"], default="torchscript")
    parser.add_argument("--export-method", choices=["tracing", "scripting"], default="tracing")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for the model")
    parser.add_argument("--sample-image", default=None, metavar="FILE",
                        help="image to trace with (default: first image of DATASETS.TEST[0])")
    parser.add_argument("--verify", action="store_true",
                        help="compare the exported and the eager model at three input sizes")
    return add_config_args(parser)


def sample_image(cfg, path=None) -> torch.Tensor:
    """(3, H, W) float image as the model's test input (resized like `DefaultPredictor`)."""
    if path is None:
        from detectron2.data import build_detection_test_loader

        if not cfg.DATASETS.TEST:
            raise ToolError("no --sample-image and DATASETS.TEST is empty")
        loader = build_detection_test_loader(cfg, cfg.DATASETS.TEST[0])
        return next(iter(loader))[0]["image"].float()
    import detectron2.data.transforms as T
    from detectron2.data import detection_utils

    if not os.path.isfile(path):
        raise ToolError(f"--sample-image not found: {path}")
    image = detection_utils.read_image(path, format=cfg.INPUT.FORMAT)
    aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    image = aug.get_transform(image).apply_image(image)
    return torch.as_tensor(image.astype("float32").transpose(2, 0, 1))


def verification_images(image: torch.Tensor):
    """The sample, and copies rescaled to a wider and a taller aspect ratio."""
    h, w = image.shape[-2:]
    sizes = [(h, w), (max(32, int(h * 0.75)), int(w * 1.1)), (int(h * 1.15), max(32, int(w * 0.8)))]
    out = []
    for size in sizes:
        resized = torch.nn.functional.interpolate(image[None], size=size, mode="bilinear",
                                                  align_corners=False)[0]
        out.append(resized)
    return out


def differences(expected, actual):
    """Per output: max |difference| (fraction of differing elements for boolean masks, which
    may flip at exactly the threshold in ONNX arithmetic); ``inf`` for a shape change."""
    diffs = []
    for e, a in zip(expected, actual):
        a = torch.as_tensor(a)
        if e.shape != a.shape:
            diffs.append(float("inf"))
        elif e.numel() == 0:
            diffs.append(0.0)
        elif e.dtype == torch.bool:
            diffs.append(float((e != a).double().mean()))
        else:
            diffs.append(float((e.double() - a.double()).abs().max()))
    return diffs


def verify(adapter, run_exported, image, tolerance=1e-2):
    """Compare exported and eager outputs; raise ToolError when they differ by > tolerance."""
    for x in verification_images(image):
        with torch.no_grad():
            expected = adapter(x)
        diffs = differences(expected, run_exported(x))
        print(f"input {tuple(x.shape[-2:])}: {expected[0].shape[0]} detections, "
              f"max |exported - eager| per output = {[f'{d:.3g}' for d in diffs]}")
        if max(diffs, default=0.0) > tolerance:
            raise ToolError(f"exported model differs from the eager one at input size "
                            f"{tuple(x.shape[-2:])}: {diffs} (outputs {adapter.outputs_schema})")


def export(cfg, fmt, output, image, check=False):
    """Export the model of ``cfg`` (weights from MODEL.WEIGHTS) traced at ``image``.

    Returns the path of the written model.
    """
    from projects.export import ExportError, export_onnx, trace

    model = build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        from detectron2.checkpoint import DetectionCheckpointer

        DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    else:
        logger.warning("MODEL.WEIGHTS is empty: exporting a randomly initialised model")
    model.eval()
    image = image.to(model.device if hasattr(model, "device") else "cpu")
    os.makedirs(output, exist_ok=True)
    try:
        if fmt == "torchscript":
            traced, adapter = trace(model, image)
            path = os.path.join(output, "model.ts")
            traced.save(path)
            run_exported = lambda x: traced(x)  # noqa: E731
        else:
            path = os.path.join(output, "model.onnx")
            adapter = export_onnx(model, image, path)
            run_exported = _onnxruntime_runner(path) if check else None
    except ExportError as e:
        raise ToolError(str(e)) from e
    with open(os.path.join(output, "schema.txt"), "w") as f:
        f.write(f"inputs: {adapter.inputs_schema}\noutputs: {adapter.outputs_schema}\n")
    logger.info("wrote %s", path)
    if check:
        verify(adapter, run_exported, image)
    return path


def _onnxruntime_runner(path):
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ToolError("--verify of an ONNX model needs onnxruntime "
                        "(pip install onnxruntime)") from e
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"image": x.detach().cpu().numpy()})


def main(argv=None):
    args = get_parser().parse_args(argv)
    from detectron2.utils.logger import setup_logger

    setup_logger(name="tools.export_model", abbrev_name="export")
    if args.export_method == "scripting":
        raise ToolError(
            "--export-method scripting is not supported: the methods' heads and post-processing "
            "are not TorchScript-scriptable (see the README section 'Export'); use tracing"
        )
    cfg = setup_cfg(args.config_file, args.opts, freeze=False)
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.freeze()
    image = sample_image(cfg, args.sample_image)
    path = export(cfg, args.format, args.output, image, check=args.verify)
    print(f"exported {args.format} model to {path}")
    return path


if __name__ == "__main__":
    try:
        main()
    except ToolError as e:
        sys.exit(f"error: {e}")
