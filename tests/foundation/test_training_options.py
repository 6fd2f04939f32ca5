"""Project-wide training options on every method's tiny model: gradient clipping by the global
norm (``SOLVER.CLIP_GRADIENTS.CLIP_TYPE full_model_norm``) and model EMA (``MODEL_EMA``).

Expected values are computed here by hand: the global norm ``sqrt(sum_p sum g_p^2)`` in float64
and one plain SGD step ``p - lr (g + wd p)``; the EMA as the closed form
``decay^k w_0 + (1 - decay) sum_i decay^(k-i) w_i`` of the weights recorded after each step.
"""
import os
import socket

import pytest
import torch
from detectron2.data import build_detection_train_loader
from detectron2.engine import HookBase
from detectron2.utils.events import EventStorage

import projects
from projects.data import CheckedDatasetMapper
from projects.engine import Trainer
from projects.engine import train as train_module
from projects.testing import TINY_RCNN_OPTS, TINY_RESNET_OPTS, load_config

_SMALL = [
    "INPUT.MIN_SIZE_TRAIN", (64,), "INPUT.MAX_SIZE_TRAIN", 96,
    "INPUT.MIN_SIZE_TEST", 64, "INPUT.MAX_SIZE_TEST", 96,
    "SOLVER.IMS_PER_BATCH", 2, "SOLVER.WARMUP_ITERS", 0, "SEED", 1,
]
_RCNN = TINY_RESNET_OPTS + TINY_RCNN_OPTS + _SMALL
# One R-50 config per method, made tiny (ResNet-18 / narrow Res2Net trunk, 64-channel FPN).
METHODS = {
    "res2net": ("res2net/mask_rcnn_R2_50_26w4s_FPN_2x.yaml", _RCNN + [
        "MODEL.RES2NET.NORM", "GN", "MODEL.RES2NET.GN_NUM_GROUPS", 8,
        "MODEL.RES2NET.FREEZE_AT", 0, "MODEL.RES2NET.BASE_WIDTH", 8,
        "MODEL.RES2NET.STEM_OUT_CHANNELS", 32, "MODEL.RES2NET.RES2_OUT_CHANNELS", 64]),
    "dynamic_rcnn": ("dynamic_rcnn/dynamic_rcnn_R_50_FPN_1x.yaml", _RCNN),
    "tsd": ("tsd/tsd_faster_rcnn_R_50_FPN_1x.yaml", _RCNN + [
        "MODEL.TSD.FC_DIM", 64, "MODEL.TSD.OFFSET_FC_DIM", 32,
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 32]),
    "decoupled_rcnn": ("decoupled_rcnn/decoupled_rcnn_R_50_FPN_2x.yaml", _RCNN + [
        "MODEL.DECOUPLED_RCNN.REG_BATCH_SIZE_PER_IMAGE", 32,
        "MODEL.DECOUPLED_RCNN.RPN_POST_NMS_TOPK_REG_TRAIN", 100]),
    "rdsnet": ("rdsnet/rdsnet_R_50_FPN_1x.yaml", TINY_RESNET_OPTS + _SMALL + [
        "MODEL.RDSNET.NUM_CLASSES", 3, "MODEL.RDSNET.PIXEL_CONV_DIM", 32]),
}


def _cfg(method, opts=()):
    config, tiny = METHODS[method]
    return load_config(projects.model_zoo.get_config_file(config), tiny + list(opts))


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _global_norm(grads):
    return float(sum(g.double().pow(2).sum() for g in grads) ** 0.5)


# --------------------------------------------------------------- global-norm clipping


def _clip_cfg(max_norm, opts=()):
    cfg = projects.get_cfg()
    cfg.merge_from_list(["SOLVER.CLIP_GRADIENTS.ENABLED", True,
                         "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "full_model_norm",
                         "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", max_norm,
                         "SOLVER.MOMENTUM", 0.0, "SOLVER.WEIGHT_DECAY", 0.0,
                         "SOLVER.BASE_LR", 1.0, *opts])
    return cfg


def test_hand_made_case_is_clipped_as_one_vector():
    """Gradients (3, 0) and (0, 4): joint norm 5 -> max 1 gives (0.6, 0) and (0, 0.8); clipping
    each tensor (Detectron2's "norm") would give (1, 0) and (0, 1)."""
    model = torch.nn.Module()
    model.a = torch.nn.Parameter(torch.zeros(2))
    model.b = torch.nn.Parameter(torch.zeros(2))
    opt = Trainer.build_optimizer(_clip_cfg(1.0), model)
    model.a.grad = torch.tensor([3.0, 0.0])
    model.b.grad = torch.tensor([0.0, 4.0])
    opt.step()
    assert torch.allclose(model.a.grad, torch.tensor([0.6, 0.0]))
    assert torch.allclose(model.b.grad, torch.tensor([0.0, 0.8]))
    # SGD at lr 1 without momentum / decay: p = -clipped g
    assert torch.allclose(model.a.detach(), torch.tensor([-0.6, 0.0]))
    assert torch.allclose(model.b.detach(), torch.tensor([0.0, -0.8]))
    # below the max: untouched
    model.a.grad = torch.tensor([0.3, 0.0])
    model.b.grad = torch.tensor([0.0, 0.4])
    opt.step()
    assert torch.allclose(model.b.grad, torch.tensor([0.0, 0.4]))


def test_unknown_clip_type_is_a_clear_error():
    with pytest.raises(ValueError, match="CLIP_TYPE='full_model'.*full_model_norm"):
        load_config(None, ["SOLVER.CLIP_GRADIENTS.ENABLED", True,
                           "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "full_model"])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_global_norm_clipping_on_each_method(method, one_thread):
    cfg = _cfg(method)
    if method in ("tsd", "rdsnet"):  # the authors' grad_clip=dict(max_norm=35, norm_type=2)
        clip = cfg.SOLVER.CLIP_GRADIENTS
        assert (clip.ENABLED, clip.CLIP_TYPE, clip.CLIP_VALUE, clip.NORM_TYPE) == (
            True, "full_model_norm", 35.0, 2.0)
    torch.manual_seed(0)
    model = Trainer.build_model(cfg)
    model.train()
    batch = next(iter(build_detection_train_loader(cfg, mapper=CheckedDatasetMapper(cfg, True))))
    with EventStorage(0):
        sum(model(batch).values()).backward()
    params = [p for p in model.parameters() if p.grad is not None]
    norm = _global_norm(p.grad for p in params)
    max_norm = norm / 4
    cfg.defrost()
    cfg.merge_from_list(["SOLVER.CLIP_GRADIENTS.ENABLED", True,
                         "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "full_model_norm",
                         "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", max_norm,
                         "SOLVER.CLIP_GRADIENTS.NORM_TYPE", 2.0, "SOLVER.MOMENTUM", 0.0])
    optimizer = Trainer.build_optimizer(cfg, model)
    hyper = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    before = {id(p): (p.detach().clone(), p.grad.clone()) for p in params}
    optimizer.step()

    assert _global_norm(p.grad for p in params) == pytest.approx(max_norm, rel=1e-4)
    scale = max_norm / norm
    for p in params:
        w0, g0 = before[id(p)]
        assert torch.allclose(p.grad, g0 * scale, rtol=1e-4, atol=1e-9)  # one common factor
        lr, wd = hyper[id(p)]
        expected = w0 - lr * (g0 * scale + wd * w0)
        assert torch.allclose(p.detach(), expected, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- EMA


class _RecordWeights(HookBase):
    """Registered last: the raw weights training starts from and has after each step."""

    def __init__(self):
        self.weights = []

    def _snapshot(self):
        model = self.trainer.model
        model = getattr(model, "module", model)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def before_train(self):
        self.weights.append(self._snapshot())

    def after_step(self):
        self.weights.append(self._snapshot())


def _flat(state):
    """Floating-point entries of a state_dict as one vector (name order), plus the names."""
    names = sorted(k for k, v in state.items() if v.is_floating_point())
    return names, torch.cat([state[k].detach().reshape(-1).float() for k in names])


def _closed_form(weights, decay):
    """``decay^k w_0 + (1 - decay) sum_{i=1..k} decay^(k-i) w_i``."""
    k = len(weights) - 1
    names, acc = _flat(weights[0])
    acc = decay ** k * acc
    for i in range(1, k + 1):
        acc = acc + (1 - decay) * decay ** (k - i) * _flat(weights[i])[1]
    return names, acc


def _assert_equal_weights(actual, expected, what):
    names, vec = expected if isinstance(expected, tuple) else _flat(expected)
    got_names, got = _flat(actual)
    assert got_names == names, what
    err = float(((got - vec).abs() - 1e-5 * vec.abs()).max())
    assert err <= 1e-6, f"{what}: values differ by up to {err}"


@pytest.fixture
def evaluated_weights(monkeypatch):
    """Replace the dataset pass of Detectron2's ``DefaultTrainer.test`` by a record of the
    weights the model holds while it is evaluated."""
    import detectron2.engine.defaults as defaults

    seen = []

    def fake_inference(model, data_loader, evaluator):
        model = getattr(model, "module", model)
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return {"bbox": {"AP": 0.0}}

    monkeypatch.setattr(defaults, "inference_on_dataset", fake_inference)
    monkeypatch.setattr(Trainer, "build_evaluator", classmethod(lambda cls, cfg, name, out=None: None))
    return seen


STEPS = 2
DECAY = 0.7  # not 0.5: decay and 1 - decay must differ


@pytest.mark.parametrize("method", sorted(METHODS))
def test_ema_on_each_method(method, tmp_path, evaluated_weights, one_thread):
    cfg = _cfg(method, ["MODEL_EMA.ENABLED", True, "MODEL_EMA.DECAY", DECAY,
                        "SOLVER.MAX_ITER", STEPS, "SOLVER.BASE_LR", 0.02,
                        "OUTPUT_DIR", str(tmp_path)])
    cfg.freeze()
    torch.manual_seed(0)
    trainer = Trainer(cfg)
    recorder = _RecordWeights()
    trainer.register_hooks([recorder])
    trainer.resume_or_load(resume=False)
    trainer.train()

    assert len(recorder.weights) == STEPS + 1
    expected = _closed_form(recorder.weights, DECAY)
    raw = recorder.weights[-1]
    assert not torch.allclose(expected[1], _flat(raw)[1], atol=1e-6), \
        "the EMA should differ from the raw weights after a few steps"

    # the final evaluation ran on the EMA weights, and training's weights came back after it
    assert len(evaluated_weights) == 1
    _assert_equal_weights(evaluated_weights[0], expected, "evaluated weights")
    model = trainer.model
    _assert_equal_weights(getattr(model, "module", model).state_dict(), raw, "model after eval")

    # the checkpoint holds both: raw under "model", the average under "ema"
    ckpt = torch.load(os.path.join(cfg.OUTPUT_DIR, "model_final.pth"), weights_only=False)
    _assert_equal_weights(ckpt["ema"]["weights"], expected, "checkpoint ema")
    _assert_equal_weights(ckpt["model"], raw, "checkpoint model")
    assert ckpt["ema"]["num_updates"] == STEPS

    # --eval-only on that checkpoint evaluates the EMA weights (a method-independent path:
    # checked on one method to save time)
    if method != "dynamic_rcnn":
        return
    args = train_module.argument_parser().parse_args([
        "--config-file", projects.model_zoo.get_config_file(METHODS[method][0]), "--eval-only",
        *[str(v) for v in METHODS[method][1]],
        "MODEL_EMA.ENABLED", "True", "MODEL.WEIGHTS", os.path.join(cfg.OUTPUT_DIR, "model_final.pth"),
        "OUTPUT_DIR", str(tmp_path / "eval")])
    train_module.main(args)
    _assert_equal_weights(evaluated_weights[-1], expected, "--eval-only weights")


def test_eval_only_with_ema_on_a_checkpoint_without_ema_is_a_clear_error(tmp_path):
    from projects.engine.ema import load_ema_from_checkpoint

    model = torch.nn.Linear(2, 2)
    with pytest.raises(KeyError, match="MODEL_EMA.ENABLED.*w.pth.*no 'ema'"):
        load_ema_from_checkpoint(model, {"iteration": 3}, "w.pth")


def test_ema_resume_restores_the_average(tmp_path, evaluated_weights, one_thread):
    """``--resume`` continues the saved average instead of restarting it from the weights."""
    opts = ["MODEL_EMA.ENABLED", True, "MODEL_EMA.DECAY", DECAY, "SOLVER.BASE_LR", 0.02,
            "OUTPUT_DIR", str(tmp_path), "SOLVER.CHECKPOINT_PERIOD", 1]
    cfg = _cfg("dynamic_rcnn", opts + ["SOLVER.MAX_ITER", 1])
    cfg.freeze()
    torch.manual_seed(0)
    first = Trainer(cfg)
    rec1 = _RecordWeights()
    first.register_hooks([rec1])
    first.resume_or_load(resume=False)
    first.train()

    cfg2 = _cfg("dynamic_rcnn", opts + ["SOLVER.MAX_ITER", 2])
    cfg2.freeze()
    second = Trainer(cfg2)
    rec2 = _RecordWeights()
    second.register_hooks([rec2])
    second.resume_or_load(resume=True)
    second.train()
    # rec2.weights[0] is the resumed w_1 (== rec1's last); one more step gives w_2
    expected = _closed_form(rec1.weights + rec2.weights[1:], DECAY)
    _assert_equal_weights(evaluated_weights[-1], expected, "EMA after resume")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ema_of_a_ddp_model_uses_the_inner_module_names():
    import torch.distributed as dist

    from projects.engine.ema import ModelEMA, ema_weights_applied

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                            world_size=1)
    try:
        inner = torch.nn.Linear(2, 1)
        ddp = torch.nn.parallel.DistributedDataParallel(inner)
        ema = ModelEMA(ddp, decay=0.5)
        assert set(ema.state_dict()["weights"]) == {"weight", "bias"}
        w0 = inner.weight.detach().clone()
        with torch.no_grad():
            inner.weight.add_(2.0)
        ema.update()
        with ema_weights_applied(ddp):  # evaluation through the wrapper sees the average
            assert torch.allclose(inner.weight, w0 + 1.0)
        assert torch.allclose(inner.weight, w0 + 2.0)
    finally:
        dist.destroy_process_group()
