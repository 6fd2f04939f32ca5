"""Checkpoint files: a verified `--resume` falls back past an unusable file, and a
`MODEL.WEIGHTS` that is not a checkpoint of the model is a clear error for `--eval-only`,
`projects.engine.Predictor` and training."""
import logging
import os

import numpy as np
import pytest
import torch
from torch import nn

import projects
from projects.engine import CheckpointError, Predictor, Trainer, VerifiedCheckpointer
from projects.engine import argument_parser, main
from projects.testing import TINY_RCNN_OPTS, TINY_RESNET_OPTS

from .conftest import QUICKSTART, cli_opts


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2)


def _checkpointer(folder, **kw):
    torch.manual_seed(0)
    return VerifiedCheckpointer(_Net(), str(folder), save_to_disk=True, **kw)


def test_resume_skips_an_unusable_last_checkpoint(tmp_path, caplog):
    ck = _checkpointer(tmp_path)
    ck.save("model_0000003", iteration=3)
    with torch.no_grad():
        ck.model.a.weight.fill_(1.0)
    ck.save("model_0000007", iteration=7)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000007.pth"
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000003.pth",
                                            "model_0000007.pth"]  # no temporary file left
    good = torch.load(tmp_path / "model_0000003.pth", weights_only=True)
    bad = tmp_path / "model_0000007.pth"
    bad.write_bytes(bad.read_bytes()[:300])  # truncated by something else

    fresh = _checkpointer(tmp_path)
    with caplog.at_level(logging.WARNING):
        extra = fresh.resume_or_load("", resume=True)
    assert extra["iteration"] == 3
    assert torch.equal(fresh.model.a.weight, good["model"]["a.weight"])
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert str(bad) in warning and str(tmp_path / "model_0000003.pth") in warning

    (tmp_path / "model_0000003.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no other complete checkpoint"):
        _checkpointer(tmp_path).resume_or_load("", resume=True)


@pytest.mark.parametrize("content, found", [
    (b"this is not a checkpoint\n", "not a checkpoint readable by torch.load"),
    ("truncated", "not a checkpoint readable by torch.load"),
    ([1, 2, 3], "holds a list"),
    ({"model": {"a.weight": "text"}}, "entry 'a.weight' of the model state is a str"),
    ({"model": [1]}, "holds a list"),
])
def test_file_that_is_not_a_checkpoint_is_named(tmp_path, content, found):
    path = tmp_path / "weights.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "truncated":
        torch.save({"model": _Net().state_dict()}, path)
        path.write_bytes(path.read_bytes()[:-200])
    else:
        torch.save(content, path)
    with pytest.raises(CheckpointError, match=found) as info:
        _checkpointer(tmp_path / "out").load(str(path))
    assert str(path) in str(info.value)


def _eval_args(weights, out):
    opts = cli_opts(TINY_RESNET_OPTS + TINY_RCNN_OPTS)
    return argument_parser().parse_args(["--config-file", QUICKSTART, "--eval-only", *opts,
                                         "MODEL.WEIGHTS", str(weights), "OUTPUT_DIR", str(out)])


def _tiny_cfg(weights):
    return projects.load_config(QUICKSTART, TINY_RESNET_OPTS + TINY_RCNN_OPTS + [
        "MODEL.WEIGHTS", str(weights)])


def _model_state(cfg):
    torch.manual_seed(0)
    return Trainer.build_model(cfg).state_dict()


def test_weights_matching_too_few_parameters_are_refused_for_inference(tmp_path):
    cfg = _tiny_cfg("")
    state = _model_state(cfg)
    n_params = sum(1 for _ in Trainer.build_model(cfg).named_parameters())
    unrelated = tmp_path / "unrelated.pth"
    torch.save({"model": {"backbone.nothing.weight": torch.zeros(3)}}, unrelated)
    # the backbone only: most of the heads would stay random
    backbone = tmp_path / "backbone.pth"
    torch.save({"model": {k: v for k, v in state.items() if k.startswith("backbone.bottom_up")}},
               backbone)
    n_backbone = sum(k.startswith("backbone.bottom_up") for k in state if not
                     k.endswith(("running_mean", "running_var", "num_batches_tracked")))

    with pytest.raises(CheckpointError, match=f"fills 0 of the model's {n_params} parameter"):
        main(_eval_args(unrelated, tmp_path / "eval"))
    with pytest.raises(CheckpointError, match=f"{backbone} fills {n_backbone} of the model's "
                                              f"{n_params} parameter tensors"):
        Predictor(_tiny_cfg(backbone))
    with pytest.raises(CheckpointError, match="not a checkpoint readable"):
        main(_eval_args(__file__, tmp_path / "eval"))
    with pytest.raises(CheckpointError, match="MODEL.WEIGHTS is empty"):
        Predictor(_tiny_cfg(""))

    complete = tmp_path / "complete.pth"
    torch.save({"model": state}, complete)
    predictor = Predictor(_tiny_cfg(complete))  # every parameter filled: accepted
    for k, v in predictor.model.state_dict().items():
        assert torch.equal(v, state[k]), k
    out = predictor(np.zeros((64, 80, 3), dtype=np.uint8))
    assert "instances" in out


def test_training_from_a_file_that_is_not_a_checkpoint_names_it(tmp_path):
    bad = tmp_path / "weights.pkl.pth"
    bad.write_bytes(b"\x80\x04garbage")
    cfg = _tiny_cfg(bad)
    cfg.OUTPUT_DIR = str(tmp_path / "out")
    cfg.DATASETS.TEST = ()
    trainer = Trainer(cfg)
    with pytest.raises(CheckpointError, match=str(bad)):
        trainer.resume_or_load(resume=False)
