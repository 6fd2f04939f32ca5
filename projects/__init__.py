"""Umbrella package: importing it registers the five methods and the built-in datasets.

    import projects
    cfg = projects.get_cfg()                  # Detectron2 defaults + every method's keys
    cfg.merge_from_file(projects.model_zoo.get_config_file("dynamic_rcnn/..."))
"""
import decoupled_rcnn  # noqa: F401  (registration side effects)
import dynamic_rcnn  # noqa: F401
import rdsnet  # noqa: F401
import res2net  # noqa: F401
import tsd  # noqa: F401
import projects_common.deform  # noqa: F401  (registers build_resnet_tv_deform_fpn_backbone)

from . import model_zoo
from .config import add_all_configs, get_cfg, load_config
from .data import register_shapes, shapes_image_glob

register_shapes()

__all__ = ["add_all_configs", "get_cfg", "load_config", "model_zoo", "shapes_image_glob"]
