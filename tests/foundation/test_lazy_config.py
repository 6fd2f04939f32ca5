"""Each method's Python LazyConfig (``configs/<method>/*.py``) is equivalent to its R-50 YAML
(same model: parameter and buffer names and shapes; same solver, schedule and data settings),
and trains through ``train_net.py``'s LazyConfig path (Detectron2's lazyconfig_train_net flow).
"""
import os

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.modeling import build_model

import projects
from projects.engine import train as train_module
from projects.testing import TINY_RCNN_OPTS, TINY_RESNET_OPTS, load_config, repo_root

LAZY = {
    "res2net": "res2net/mask_rcnn_R2_50_26w4s_FPN_2x",
    "dynamic_rcnn": "dynamic_rcnn/dynamic_rcnn_R_50_FPN_1x",
    "tsd": "tsd/tsd_faster_rcnn_R_50_FPN_1x",
    "decoupled_rcnn": "decoupled_rcnn/decoupled_rcnn_R_50_FPN_2x",
    "rdsnet": "rdsnet/rdsnet_R_50_FPN_1x",
}


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", sorted(LAZY))
def test_lazy_config_builds_the_yaml_model(method):
    base = os.path.join(repo_root(), "configs", LAZY[method])
    lazy = LazyConfig.load(base + ".py")
    yaml = load_config(base + ".yaml")

    torch.manual_seed(0)
    from_yaml = _shapes(build_model(yaml))
    from_lazy = _shapes(instantiate(lazy.model))
    assert list(from_lazy) == list(from_yaml)
    assert from_lazy == from_yaml

    s = yaml.SOLVER
    assert (lazy.optimizer.lr, lazy.optimizer.momentum, lazy.optimizer.weight_decay) == (
        s.BASE_LR, s.MOMENTUM, s.WEIGHT_DECAY)
    assert lazy.optimizer.params.weight_decay_norm == s.WEIGHT_DECAY_NORM
    if method in ("tsd", "rdsnet"):  # global-norm clipping at 35 carried over
        assert lazy.optimizer.max_norm == 35.0 and lazy.optimizer.norm_type == 2.0
    else:
        assert "max_norm" not in lazy.optimizer
    assert lazy.train.max_iter == s.MAX_ITER
    assert lazy.train.init_checkpoint == yaml.MODEL.WEIGHTS
    assert list(lazy.lr_multiplier.scheduler.milestones) == [x for x in s.STEPS if x <= s.MAX_ITER]
    assert lazy.lr_multiplier.warmup_length == pytest.approx(s.WARMUP_ITERS / s.MAX_ITER)
    assert lazy.dataloader.train.total_batch_size == s.IMS_PER_BATCH
    assert list(lazy.dataloader.train.dataset.names) == list(yaml.DATASETS.TRAIN)
    assert lazy.dataloader.train.mapper.image_format == yaml.INPUT.FORMAT
    resize = lazy.dataloader.train.mapper.augmentations[0]
    assert list(resize.short_edge_length) == list(yaml.INPUT.MIN_SIZE_TRAIN)
    assert resize.max_size == yaml.INPUT.MAX_SIZE_TRAIN


def test_lazy_override_of_model_keys_changes_the_model():
    lazy = LazyConfig.load(os.path.join(repo_root(), "configs", LAZY["dynamic_rcnn"] + ".py"))
    lazy = LazyConfig.apply_overrides(lazy, ["model.cfg.MODEL.ROI_HEADS.NUM_CLASSES=3"])
    shapes = _shapes(instantiate(lazy.model))
    assert shapes["roi_heads.box_predictor.cls_score.weight"][0] == 4  # 3 classes + background


def test_train_net_trains_and_evaluates_a_lazy_config(tmp_path, monkeypatch):
    """``train_net.py --config-file x.py key=value ...``: a user's LazyConfig made from a
    method's YAML with tiny settings trains 2 iterations, checkpoints and evaluates."""
    import detectron2.engine.defaults  # noqa: F401
    from projects.engine import lazy_train

    tiny = TINY_RESNET_OPTS + TINY_RCNN_OPTS + [
        "INPUT.MIN_SIZE_TRAIN", (64,), "INPUT.MAX_SIZE_TRAIN", 96, "INPUT.MIN_SIZE_TEST", 64,
        "INPUT.MAX_SIZE_TEST", 96, "SOLVER.IMS_PER_BATCH", 2, "MODEL.DEVICE", "cpu"]
    yaml = projects.model_zoo.get_config_file(LAZY["dynamic_rcnn"] + ".yaml")
    user = tmp_path / "tiny_dynamic_rcnn.py"
    user.write_text(
        "from projects.lazy import lazy_sections\n"
        f"model, dataloader, optimizer, lr_multiplier, train = lazy_sections({yaml!r}, {tiny!r})\n")
    seen = []

    def one_image_inference(model, loader, evaluator):
        """The configured evaluator on one image with one made-up detection (the real
        inference over the 80 images of shapes_val is too slow for the suite)."""
        from detectron2.structures import Boxes, Instances

        seen.append(model)
        first = next(iter(loader))[0]
        det = Instances((first["height"], first["width"]), pred_boxes=Boxes(torch.tensor(
            [[10.0, 10.0, 40.0, 40.0]])), scores=torch.tensor([0.9]),
            pred_classes=torch.tensor([0]))
        evaluator.reset()
        evaluator.process([first], [{"instances": det}])
        return evaluator.evaluate()

    monkeypatch.setattr(lazy_train, "inference_on_dataset", one_image_inference)
    args = train_module.argument_parser().parse_args([
        "--config-file", str(user), "train.max_iter=2", f"train.output_dir={tmp_path / 'out'}",
        "train.checkpointer.period=100", "train.seed=1"])
    results = train_module.main(args)
    assert len(seen) == 1 and 0.0 <= results["bbox"]["AP"] <= 100.0
    ckpt = torch.load(tmp_path / "out" / "model_final.pth", weights_only=False)
    assert ckpt["iteration"] == 1
    expected = _shapes(build_model(load_config(yaml, tiny)))
    assert {k: tuple(v.shape) for k, v in ckpt["model"].items()} == expected


def test_lazy_overrides_must_be_key_value(tmp_path):
    from projects.engine.lazy_train import setup_lazy

    args = train_module.argument_parser().parse_args([
        "--config-file", os.path.join(repo_root(), "configs", LAZY["tsd"] + ".py"),
        "train.max_iter", "2"])
    with pytest.raises(ValueError, match="key=value"):
        setup_lazy(args)
