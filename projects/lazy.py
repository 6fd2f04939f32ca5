"""Python LazyConfigs (Detectron2's ``LazyConfig`` format) for the methods' YAML configs.

``configs/<method>/<name>.py`` holds the sections Detectron2's ``lazyconfig_train_net.py``
reads (``model``, ``dataloader``, ``optimizer``, ``lr_multiplier``, ``train``), made by
`lazy_sections` from the YAML of the same name, so both formats describe the same detector:

* ``model``: ``L(build_model_from_config)(cfg={...})``; the nested dict holds every config key
  (``MODEL.*``, ``INPUT.*``, ...) with the YAML's values, so a LazyConfig override reads
  ``model.cfg.MODEL.ROI_HEADS.NUM_CLASSES=3``. The model is built by the method's own
  ``@configurable`` classes exactly as from the YAML (one source of truth for the
  architecture, its converters and its tests). Only the keys the model reads matter there
  (``MODEL.*`` and the few input keys a method reads); data, solver and schedule are set by
  the sections below;
* ``dataloader.train`` / ``dataloader.test`` / ``dataloader.evaluator``: Detectron2's loaders
  with this project's checked mapper and the YAML's resize / flip augmentations, batch size,
  workers and datasets; `COCOEvaluator` (`coco_evaluator`: fast evaluation only where compiled);
* ``optimizer``: SGD on Detectron2's ``get_default_optimizer_params`` with the YAML's learning
  rate, momentum and weight decays (``SOLVER.CLIP_GRADIENTS`` of type ``full_model_norm``
  becomes `projects.engine.clip.global_norm_clipped_sgd`);
* ``lr_multiplier``: the YAML's multi-step schedule with linear / constant warm-up;
* ``train``: ``max_iter``, ``init_checkpoint`` (``MODEL.WEIGHTS``), checkpoint and evaluation
  periods, AMP, DDP options, device.
"""
import inspect
import os

from detectron2.config import LazyCall as L

__all__ = ["lazy_sections", "build_model_from_config", "config_from_dict", "coco_evaluator"]


def _to_plain(node):
    """A yacs node as nested plain dicts / lists (tuples become lists)."""
    if isinstance(node, dict):
        return {k: _to_plain(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_to_plain(v) for v in node]
    return node


def config_from_dict(cfg):
    """The project's yacs config (every method's keys) with the values of ``cfg`` (a nested
    dict or DictConfig as stored in ``model.cfg``); unknown keys are errors naming the key."""
    from omegaconf import DictConfig, OmegaConf

    from .config import get_cfg, resolve_device
    from detectron2.config import CfgNode

    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    out = get_cfg()
    try:
        out.merge_from_other_cfg(CfgNode(cfg))
    except KeyError as e:
        raise KeyError(f"LazyConfig model.cfg: {e}") from e
    return resolve_device(out)


def build_model_from_config(cfg):
    """Build the model of a config given as a nested dict (``model.cfg`` of a LazyConfig) with
    Detectron2's ``build_model`` (the methods register their classes on import)."""
    import projects  # noqa: F401  (registers the five methods)
    from detectron2.modeling import build_model

    return build_model(config_from_dict(cfg))


def coco_evaluator(dataset_name, output_dir=None):
    """Detectron2's `COCOEvaluator` as the project's `Trainer` builds it: the dataset's COCO
    files prepared, the compiled fast evaluation only where it is installed."""
    from detectron2.evaluation import COCOEvaluator

    from .data.builtin import prepare_dataset_files
    from .engine.trainer import compiled_coco_eval_available

    prepare_dataset_files(dataset_name)
    return COCOEvaluator(dataset_name, output_dir=output_dir,
                         use_fast_impl=compiled_coco_eval_available())


def _lazy_augmentation(aug):
    """``L(type(aug))(**its constructor arguments)`` for a Detectron2 augmentation object."""
    params = inspect.signature(type(aug).__init__).parameters
    kwargs = {k: getattr(aug, k) for k in params if k != "self" and hasattr(aug, k)}
    kwargs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()}
    return L(type(aug))(**kwargs)


def _lazy_mapper(cfg, is_train):
    from .data import CheckedDatasetMapper

    kwargs = CheckedDatasetMapper.from_config(cfg, is_train)
    kwargs["augmentations"] = [_lazy_augmentation(a) for a in kwargs["augmentations"]]
    kwargs = {k: v for k, v in kwargs.items() if v is not None or k == "keypoint_hflip_indices"}
    if kwargs.get("keypoint_hflip_indices") is not None:
        kwargs["keypoint_hflip_indices"] = list(map(int, kwargs["keypoint_hflip_indices"]))
    return L(CheckedDatasetMapper)(**kwargs)


def _lazy_optimizer(cfg):
    import torch
    from detectron2.solver.build import get_default_optimizer_params

    from .engine.clip import global_norm_clipped_sgd

    s = cfg.SOLVER
    params = L(get_default_optimizer_params)(
        base_lr=s.BASE_LR, weight_decay_norm=s.WEIGHT_DECAY_NORM,
        bias_lr_factor=s.BIAS_LR_FACTOR, weight_decay_bias=s.WEIGHT_DECAY_BIAS)
    sgd = dict(params=params, lr=s.BASE_LR, momentum=s.MOMENTUM, nesterov=s.NESTEROV,
               weight_decay=s.WEIGHT_DECAY)
    clip = s.CLIP_GRADIENTS
    if not clip.ENABLED:
        return L(torch.optim.SGD)(**sgd)
    if clip.CLIP_TYPE == "full_model_norm":
        return L(global_norm_clipped_sgd)(max_norm=clip.CLIP_VALUE, norm_type=clip.NORM_TYPE, **sgd)
    raise ValueError(
        f"SOLVER.CLIP_GRADIENTS.CLIP_TYPE={clip.CLIP_TYPE!r} (per-tensor clipping) has no "
        "LazyConfig form here; use 'full_model_norm' or the YAML config")


def _lazy_lr_multiplier(cfg):
    from detectron2.solver import WarmupParamScheduler
    from fvcore.common.param_scheduler import MultiStepParamScheduler

    s = cfg.SOLVER
    if s.LR_SCHEDULER_NAME != "WarmupMultiStepLR":
        raise ValueError(f"SOLVER.LR_SCHEDULER_NAME={s.LR_SCHEDULER_NAME!r}: only "
                         "WarmupMultiStepLR has a LazyConfig form here")
    steps = [x for x in s.STEPS if x <= s.MAX_ITER]
    return L(WarmupParamScheduler)(
        scheduler=L(MultiStepParamScheduler)(
            values=[s.GAMMA ** k for k in range(len(steps) + 1)], milestones=steps,
            num_updates=s.MAX_ITER),
        warmup_length=min(s.WARMUP_ITERS / s.MAX_ITER, 1.0),
        warmup_method=s.WARMUP_METHOD,
        warmup_factor=s.WARMUP_FACTOR,
    )


def lazy_sections(config_file, opts=()):
    """``model, dataloader, optimizer, lr_multiplier, train`` (DictConfigs) equivalent to the
    YAML ``config_file`` (plus ``KEY VALUE`` ``opts``); see the module docstring."""
    from detectron2.data import build_detection_test_loader, build_detection_train_loader
    from detectron2.data import get_detection_dataset_dicts
    from omegaconf import OmegaConf

    from .config import load_config

    cfg = load_config(config_file, list(opts))
    model = L(build_model_from_config)(cfg=_to_plain(cfg))
    dataloader = OmegaConf.create()
    dataloader.train = L(build_detection_train_loader)(
        dataset=L(get_detection_dataset_dicts)(
            names=list(cfg.DATASETS.TRAIN),
            filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
            min_keypoints=0),
        mapper=_lazy_mapper(cfg, True),
        total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
        aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
    )
    test_name = cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else ""
    dataloader.test = L(build_detection_test_loader)(
        dataset=L(get_detection_dataset_dicts)(names=test_name, filter_empty=False),
        mapper=_lazy_mapper(cfg, False),
        num_workers=cfg.DATALOADER.NUM_WORKERS,
    )
    dataloader.evaluator = L(coco_evaluator)(dataset_name="${..test.dataset.names}")
    train = OmegaConf.create(dict(
        output_dir=cfg.OUTPUT_DIR,
        init_checkpoint=cfg.MODEL.WEIGHTS,
        max_iter=cfg.SOLVER.MAX_ITER,
        amp=dict(enabled=cfg.SOLVER.AMP.ENABLED),
        ddp=dict(broadcast_buffers=False, find_unused_parameters=False, fp16_compression=False),
        checkpointer=dict(period=cfg.SOLVER.CHECKPOINT_PERIOD, max_to_keep=100),
        eval_period=cfg.TEST.EVAL_PERIOD,
        log_period=20,
        device=cfg.MODEL.DEVICE,
        seed=cfg.SEED,
    ))
    return model, dataloader, _lazy_optimizer(cfg), _lazy_lr_multiplier(cfg), train


def yaml_next_to(py_file):
    """The YAML config named like the LazyConfig file ``py_file`` (``x.py`` -> ``x.yaml``)."""
    path = os.path.splitext(py_file)[0] + ".yaml"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LazyConfig {py_file}: no YAML {path} next to it")
    return path
