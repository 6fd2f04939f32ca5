"""`DecoupledRCNN`: Detectron2's `GeneralizedRCNN` with the authors' FPN initialisation.

The authors' FPN (mmdetection v2.4 ``FPN.init_weights``) initialises every lateral and output
conv with ``xavier_init(distribution='uniform')``: Xavier-uniform weights (gain 1) and zero
bias. Detectron2's FPN uses ``c2_xavier_fill`` (Kaiming-uniform with a = 1, i.e. a bound of
sqrt(3 / fan_in) instead of sqrt(6 / (fan_in + fan_out))). Only training from ImageNet weights
sees the difference: a loaded detector checkpoint overwrites both.
"""
import torch
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN
from torch import nn

__all__ = ["DecoupledRCNN", "init_fpn", "FPN_INITS"]

FPN_INITS = ("xavier_uniform", "c2_xavier")


@torch.no_grad()
def init_fpn(backbone: nn.Module, mode: str) -> None:
    """Re-initialise the FPN convs of ``backbone`` (every Conv2d outside ``bottom_up``).

    Args:
        backbone: a Detectron2 FPN backbone (has a ``bottom_up`` trunk).
        mode: "xavier_uniform" (mmdet ``xavier_init``: uniform, gain 1, bias 0) or
            "c2_xavier" (keep Detectron2's initialisation).
    """
    if mode not in FPN_INITS:
        raise ValueError(f"MODEL.DECOUPLED_RCNN.FPN_INIT={mode!r} is not one of {FPN_INITS}")
    if mode == "c2_xavier":
        return
    if not hasattr(backbone, "bottom_up"):
        raise ValueError(
            f"MODEL.DECOUPLED_RCNN.FPN_INIT={mode!r} needs an FPN backbone with a 'bottom_up' "
            f"trunk, got {type(backbone).__name__}; set FPN_INIT 'c2_xavier'"
        )
    for name, module in backbone.named_modules():
        if name.startswith("bottom_up") or not isinstance(module, nn.Conv2d):
            continue
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


@META_ARCH_REGISTRY.register()
class DecoupledRCNN(GeneralizedRCNN):
    """`GeneralizedRCNN` whose FPN convs follow ``MODEL.DECOUPLED_RCNN.FPN_INIT``."""

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        init_fpn(ret["backbone"], cfg.MODEL.DECOUPLED_RCNN.FPN_INIT)
        return ret
