"""Convert Res2Net / ResNet checkpoints to this package's Detectron2 layout.

Source layouts (detected automatically, or forced with ``layout=``):

* ``"official"``: Res2Net-PretrainedModels ``res2net.py`` / ``res2net_v1b.py`` = timm
  (``conv1``/``bn1`` or ``conv1.{0,1,3,4,6}``/``bn1`` stem, ``layer{L}.{j}.conv1/bn1/convs.{i}/
  bns.{i}/conv3/bn3/downsample.*``, ``fc``); also torchvision ResNets (``conv2``/``bn2`` = the one
  3x3 conv of a scale-1 block);
* ``"mmdet"``: ``[backbone.]stem.{0,1,3,4,6,7}``, ``layer*`` as official (BN checkpoints),
  ``convs.{i}.conv_offset`` for DCN;
* ``"maskrcnn_benchmark"``: ``backbone.body.stem.conv1/bn1``, ``backbone.body.layer*`` (v1).

Target: ``stem.conv1[.norm]`` (v1) or ``stem.conv{1,2,3}[.norm]`` (v1b),
``res{L+1}.{j}.conv1[.norm]``, ``.convs.{i}``, ``.bns.{i}``, ``.conv3[.norm]``,
``.shortcut[.norm]``, ``.convs_offset.{i}``, with a prefix (``backbone.bottom_up.`` for the FPN
backbones). ``num_batches_tracked`` and ``fc`` are dropped explicitly; every other key must map,
every target key must be filled with the right shape (`projects_common.checkpoint`).
"""
import os
import pickle
import re
from typing import Dict, Mapping, Optional, Tuple

import torch

from projects_common.checkpoint import (
    DROP,
    ConversionError,
    convert_state_dict,
    load_upstream_state_dict,
    save_converted_checkpoint,
)

from .backbone import BLOCKS_PER_STAGE, build_res2net

__all__ = [
    "EXPECTED_TENSOR_COUNTS",
    "LAYOUTS",
    "convert_res2net_checkpoint",
    "convert_res2net_state_dict",
    "default_output_name",
    "detect_layout",
    "infer_architecture",
    "output_format",
]

LAYOUTS = ("official", "mmdet", "maskrcnn_benchmark")

# backbone tensors of the converted trunk (FrozenBN, no fc), keyed by
# (variant, depth, base_width, scale).
EXPECTED_TENSOR_COUNTS = {
    ("v1", 50, 26, 4): 425,
    ("v1b", 50, 26, 4): 435,
    ("v1", 101, 26, 4): 850,
    ("v1b", 101, 26, 4): 860,
    ("v1", 50, 48, 2): 265,
    ("v1", 50, 14, 8): 745,
}

_BN = r"(weight|bias|running_mean|running_var)"
# Layer keys are the same in the three layouts (after their prefixes are removed).
_LAYER_RULES = [
    (rf"^layer(\d)\.(\d+)\.bn1\.{_BN}$", r"{L}.\2.conv1.norm.\3"),
    (rf"^layer(\d)\.(\d+)\.bn3\.{_BN}$", r"{L}.\2.conv3.norm.\3"),
    (r"^layer(\d)\.(\d+)\.(conv1|conv3)\.weight$", r"{L}.\2.\3.weight"),
    (r"^layer(\d)\.(\d+)\.convs\.(\d+)\.weight$", r"{L}.\2.convs.\3.weight"),
    (r"^layer(\d)\.(\d+)\.convs\.(\d+)\.conv_offset\.(weight|bias)$", r"{L}.\2.convs_offset.\3.\4"),
    (rf"^layer(\d)\.(\d+)\.bns\.(\d+)\.{_BN}$", r"{L}.\2.bns.\3.\4"),
    # torchvision ResNet bottleneck: its single 3x3 conv is K_1 of a scale-1 block.
    (r"^layer(\d)\.(\d+)\.conv2\.weight$", r"{L}.\2.convs.0.weight"),
    (rf"^layer(\d)\.(\d+)\.bn2\.{_BN}$", r"{L}.\2.bns.0.\3"),
]
_SHORTCUT_RULES = {
    # v1: strided 1x1 conv + BN; v1b: (pool) + 1x1 conv + BN.
    "v1": [
        (r"^layer(\d)\.(\d+)\.downsample\.0\.weight$", r"{L}.\2.shortcut.weight"),
        (rf"^layer(\d)\.(\d+)\.downsample\.1\.{_BN}$", r"{L}.\2.shortcut.norm.\3"),
    ],
    "v1b": [
        (r"^layer(\d)\.(\d+)\.downsample\.1\.weight$", r"{L}.\2.shortcut.weight"),
        (rf"^layer(\d)\.(\d+)\.downsample\.2\.{_BN}$", r"{L}.\2.shortcut.norm.\3"),
    ],
}
_STEM_RULES = {
    ("official", "v1"): [
        (r"^conv1\.weight$", "stem.conv1.weight"),
        (rf"^bn1\.{_BN}$", r"stem.conv1.norm.\1"),
    ],
    ("official", "v1b"): [
        (r"^conv1\.0\.weight$", "stem.conv1.weight"),
        (rf"^conv1\.1\.{_BN}$", r"stem.conv1.norm.\1"),
        (r"^conv1\.3\.weight$", "stem.conv2.weight"),
        (rf"^conv1\.4\.{_BN}$", r"stem.conv2.norm.\1"),
        (r"^conv1\.6\.weight$", "stem.conv3.weight"),
        (rf"^bn1\.{_BN}$", r"stem.conv3.norm.\1"),
    ],
    ("mmdet", "v1b"): [
        (r"^stem\.0\.weight$", "stem.conv1.weight"),
        (rf"^stem\.1\.{_BN}$", r"stem.conv1.norm.\1"),
        (r"^stem\.3\.weight$", "stem.conv2.weight"),
        (rf"^stem\.4\.{_BN}$", r"stem.conv2.norm.\1"),
        (r"^stem\.6\.weight$", "stem.conv3.weight"),
        (rf"^stem\.7\.{_BN}$", r"stem.conv3.norm.\1"),
    ],
    ("maskrcnn_benchmark", "v1"): [
        (r"^stem\.conv1\.weight$", "stem.conv1.weight"),
        (rf"^stem\.bn1\.{_BN}$", r"stem.conv1.norm.\1"),
    ],
}
# Prefix of the backbone body in each layout's (detector) checkpoints.
_BODY_PREFIX = {"official": "", "mmdet": "backbone.", "maskrcnn_benchmark": "backbone.body."}


def detect_layout(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Return "official", "mmdet" or "maskrcnn_benchmark" from the key names."""
    keys = list(state_dict)
    if any(k.startswith("backbone.body.") for k in keys):
        return "maskrcnn_benchmark"
    if any(k.startswith(("stem.0.", "backbone.stem.0.")) for k in keys):
        return "mmdet"
    if any(k in ("conv1.weight", "conv1.0.weight") for k in keys):
        return "official"
    raise ConversionError(
        "cannot recognise the checkpoint layout (no 'conv1.weight'/'conv1.0.weight' "
        "(official/timm), 'stem.0.weight' (mmdet) or 'backbone.body.*' (maskrcnn-benchmark) "
        "key); first keys: "
        + ", ".join(keys[:5])
    )


def _body(state_dict, layout):
    """Backbone-body keys with the layout's prefix removed; other keys separately."""
    prefix = _BODY_PREFIX[layout]
    body, other = {}, {}
    for k, v in state_dict.items():
        if k.startswith(prefix):
            body[k[len(prefix):]] = v
        else:
            other[k] = v
    if layout == "mmdet" and not body:  # a bare mmdet backbone file has no "backbone." prefix
        body, other = other, {}
    return body, other


def infer_architecture(
    body: Mapping[str, torch.Tensor], layout: str, deform_modulated: Optional[bool] = None
) -> dict:
    """Read variant, depth, base width, scale, channels and DCN settings from body keys.

    ``deform_modulated`` settles DCN checkpoints whose offset channels fit both DCNv1 and DCNv2.

    Returns the keyword arguments of `build_res2net` that describe the checkpoint.
    """
    def need(key):
        if key not in body:
            raise ConversionError(f"{layout} checkpoint lacks {key!r}; not a Res2Net/ResNet trunk")
        return body[key]

    variant = "v1b" if ("conv1.0.weight" in body or "stem.0.weight" in body) else "v1"
    conv1 = need("layer1.0.conv1.weight")
    k1 = "layer1.0.convs.0.weight" if "layer1.0.convs.0.weight" in body else "layer1.0.conv2.weight"
    width = need(k1).shape[0]
    inner = conv1.shape[0]
    if inner % width:
        raise ConversionError(
            f"layer1.0.conv1 has {inner} channels, not a multiple of width {width}"
        )
    scale = inner // width
    num_convs = len({k for k in body if re.match(r"^layer1\.0\.convs\.\d+\.weight$", k)})
    if k1.endswith("convs.0.weight") and num_convs != max(scale - 1, 1):
        raise ConversionError(
            f"layer1.0 has {num_convs} 3x3 convs but conv1/convs.0 widths give scale {scale}"
        )
    blocks = [
        len({int(m.group(1)) for k in body for m in [re.match(rf"^layer{i}\.(\d+)\.", k)] if m})
        for i in range(1, 5)
    ]
    depths = [d for d, b in BLOCKS_PER_STAGE.items() if b == blocks]
    if not depths:
        raise ConversionError(
            f"blocks per stage {blocks} match no supported depth {BLOCKS_PER_STAGE}"
        )
    deform = [any(re.match(rf"^layer{i}\.\d+\.convs\.\d+\.conv_offset\.", k) for k in body)
              for i in range(1, 5)]
    arch = dict(
        depth=depths[0], scale=scale, base_width=width, variant=variant,
        stem_out_channels=conv1.shape[1], res2_out_channels=need("layer1.0.conv3.weight").shape[0],
        deform_on_per_stage=deform,
    )
    if any(deform):
        stage = deform.index(True) + 1
        name, off = next((k, v) for k, v in body.items()
                         if re.match(rf"^layer{stage}\.\d+\.convs\.\d+\.conv_offset\.weight$", k))
        arch.update(_deform_settings(name, off.shape[0], deform_modulated))
    return arch


def _deform_settings(name: str, channels: int, modulated: Optional[bool]) -> dict:
    """DCN version and group count from the offset conv's output channels: DCNv1
    has 18 per deformable group (x, y per tap), DCNv2 27 (plus a mask per tap). Counts divisible
    by both (54, 108, ...) are ambiguous (54 = DCNv1 x 3 groups = DCNv2 x 2 groups): then the
    caller must say which (``deform_modulated``)."""
    fits = {m: channels % per == 0 for m, per in ((True, 27), (False, 18))}
    if modulated is None:
        if fits[True] and fits[False]:
            raise ConversionError(
                f"{name} has {channels} output channels: DCNv1 with {channels // 18} deformable "
                f"groups or DCNv2 (modulated) with {channels // 27}; the checkpoint does not say "
                "which. Pass deform_modulated=True/False (--dcn-v2 / --dcn-v1)"
            )
        modulated = fits[True]
    if not fits[modulated]:
        per = 27 if modulated else 18
        raise ConversionError(
            f"{name} has {channels} output channels, not a multiple of {per} "
            f"({'DCNv2' if modulated else 'DCNv1'}: {per} per deformable group)"
        )
    return dict(deform_modulated=modulated, deform_num_groups=channels // (27 if modulated else 18))


def default_output_name(arch: dict) -> str:
    """File name the configs expect, e.g. ``res2net50_v1b_26w_4s_d2.pth``; scale-1 trunks
    (plain ResNets) are ``resnet50_v1_d2.pth``."""
    if arch["scale"] == 1:
        return f"resnet{arch['depth']}_{arch['variant']}_d2.pth"
    return f"res2net{arch['depth']}_{arch['variant']}_{arch['base_width']}w_{arch['scale']}s_d2.pth"


def convert_res2net_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    *,
    layout: str = "auto",
    prefix: str = "backbone.bottom_up.",
    keep_fc: bool = False,
    drop_non_backbone: bool = False,
    deform_modulated: Optional[bool] = None,
) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Convert an upstream state dict; return ``(converted, info)``.

    Args:
        layout: one of `LAYOUTS` or "auto" (`detect_layout`).
        prefix: prepended to every converted key: ``"backbone.bottom_up."`` for
            ``build_res2net_fpn_backbone`` / ``build_res2net_p67_fpn_backbone`` detectors,
            ``"backbone."`` for ``build_res2net_backbone``, ``""`` for a bare trunk.
        keep_fc: map the ImageNet ``fc`` to the trunk's ``linear`` classifier instead of
            dropping it.
        drop_non_backbone: drop (and count) the neck/head keys of a whole-detector checkpoint;
            otherwise they are reported as unknown keys.
        deform_modulated: for DCN checkpoints, True = DCNv2 (27 offset channels per group),
            False = DCNv1 (18); None reads it from the channel count and refuses counts that
            fit both (54 = 3 DCNv1 groups = 2 DCNv2 groups).

    ``info`` holds the detected ``layout``, the architecture (`infer_architecture`), the list of
    ``dropped`` keys and the number of converted backbone tensors.
    """
    state_dict = {k[len("module."):] if k.startswith("module.") else k: v
                  for k, v in state_dict.items()}
    if layout == "auto":
        layout = detect_layout(state_dict)
    if layout not in LAYOUTS:
        raise ConversionError(f"layout must be 'auto' or one of {LAYOUTS}, got {layout!r}")
    body, other = _body(state_dict, layout)
    if other and not drop_non_backbone:
        raise ConversionError(
            f"{len(other)} unknown source key(s) outside the {layout} backbone body "
            f"(pass drop_non_backbone / --drop-non-backbone to drop them): " + ", ".join(other)
        )
    arch = infer_architecture(body, layout, deform_modulated)
    variant = arch["variant"]
    if (layout, variant) not in _STEM_RULES:
        raise ConversionError(f"{layout} checkpoints with a {variant} stem are not a known layout")
    rules = _STEM_RULES[(layout, variant)] + _LAYER_RULES + _SHORTCUT_RULES[variant]
    dropped = list(other)
    has_fc = "fc.weight" in body

    def map_key(key):
        if key.endswith("num_batches_tracked") or (key in ("fc.weight", "fc.bias") and not keep_fc):
            dropped.append(key)
            return DROP
        if keep_fc and key in ("fc.weight", "fc.bias"):
            return "linear." + key.split(".")[1]
        for pattern, repl in rules:
            m = re.match(pattern, key)
            if m:
                stage = f"res{int(m.group(1)) + 1}" if key.startswith("layer") else ""
                return m.expand(repl.replace("{L}", stage))
        return None

    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = build_res2net(
            norm="FrozenBN", out_features=None,
            num_classes=body["fc.weight"].shape[0] if (keep_fc and has_fc) else None, **arch
        )
    target_shapes = {k: v.shape for k, v in model.state_dict().items()}
    if keep_fc and not has_fc:
        raise ConversionError("keep_fc: the checkpoint has no 'fc.weight'")
    converted = convert_state_dict(body, map_key, target_shapes)
    key_arch = (variant, arch["depth"], arch["base_width"], arch["scale"])
    expected = None if any(arch["deform_on_per_stage"]) else EXPECTED_TENSOR_COUNTS.get(key_arch)
    num_backbone = sum(not k.startswith("linear.") for k in converted)
    if expected is not None and num_backbone != expected:
        raise ConversionError(
            f"{key_arch}: {num_backbone} converted tensors, expected {expected}"
        )
    info = dict(layout=layout, arch=arch, dropped=dropped, num_converted=num_backbone)
    return {prefix + k: v for k, v in converted.items()}, info


def convert_res2net_checkpoint(
    src: str, dst: Optional[str] = None, **kwargs
) -> Tuple[Dict[str, torch.Tensor], dict, str]:
    """Read ``src`` (.pth/.pkl; ``module.``, ``state_dict``, ``model`` wrappers tolerated),
    convert it with `convert_res2net_state_dict` (``kwargs``) and write ``dst`` (default: the
    configs' file name `default_output_name` next to ``src``) as ``{"model": ...}``: a torch file
    for ``.pth``/``.pt``, a Detectron2 pickle (numpy arrays) for ``.pkl``; other names are refused.

    Returns ``(converted, info, dst)``.
    """
    if dst is not None:
        output_format(dst)  # refuse an unknown extension before the work
    converted, info = convert_res2net_state_dict(load_upstream_state_dict(src), **kwargs)
    if dst is None:
        dst = os.path.join(os.path.dirname(os.path.abspath(src)), default_output_name(info["arch"]))
    author = f"res2net converter ({info['layout']}: {os.path.basename(src)})"
    if output_format(dst) == "pkl":
        # Detectron2's pickle format: numpy arrays under "model"; "__author__" marks it as a
        # Detectron2 file (not a Caffe2 one), keys are exact (no matching heuristics).
        with open(dst, "wb") as f:
            pickle.dump({"model": {k: v.cpu().numpy() for k, v in converted.items()},
                         "__author__": author, "matching_heuristics": False}, f)
    else:
        save_converted_checkpoint(converted, dst, author=author)
    return converted, info, dst


def output_format(dst: str) -> str:
    """"pth" for ``.pth``/``.pt`` (torch file), "pkl" for ``.pkl`` (Detectron2 pickle); any other
    extension is refused, since `DetectionCheckpointer` picks the reader by extension."""
    ext = os.path.splitext(dst)[1].lower()
    if ext in (".pth", ".pt"):
        return "pth"
    if ext == ".pkl":
        return "pkl"
    raise ConversionError(
        f"output file {dst!r}: use a .pth/.pt name (torch file) or .pkl (Detectron2 pickle); "
        "Detectron2 reads a file by its extension"
    )
