"""Two CPU processes (gloo): the project's Trainer wraps CPU models in DDP with
``device_ids=None`` and keeps the replicas identical."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from projects.testing import TINY_RCNN_OPTS, TINY_RESNET_OPTS, ddp_train_worker

from .conftest import QUICKSTART


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_workers_train_in_sync(tmp_path):
    opts = TINY_RESNET_OPTS + TINY_RCNN_OPTS + [
        "SOLVER.IMS_PER_BATCH", 4, "SOLVER.MAX_ITER", 3, "TEST.EVAL_PERIOD", 0, "DATASETS.TEST", (),
        "MODEL.DEVICE", "cpu"]  # the CPU-worker path, also where TEST_DEVICE is cuda
    mp.start_processes(ddp_train_worker, nprocs=2, start_method="spawn",
                       args=(2, _free_port(), str(tmp_path), QUICKSTART, opts))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["ddp"] and r1["ddp"]
    assert r0["params"].keys() == r1["params"].keys()
    for k in r0["params"]:
        if "running_" in k or "num_batches_tracked" in k:
            continue  # BN statistics are per process (broadcast_buffers=False, as Detectron2)
        assert torch.allclose(r0["params"][k], r1["params"][k]), k


def test_num_gpus_on_cpu_is_supported_or_refused_clearly(tmp_path, monkeypatch):
    from projects.engine import argument_parser
    from projects.engine import train as train_module


    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the CPU-worker path does not apply")
    args = argument_parser().parse_args(["--config-file", QUICKSTART, "--num-gpus", "2"])
    if train_module._launch_supports_cpu_workers():
        calls = []
        monkeypatch.setattr(train_module, "launch", lambda *a, **k: calls.append((a, k)))
        train_module.run(args)
        assert calls and calls[0][0][1] == 2
    else:
        with pytest.raises(SystemExit, match="--num-gpus 2 without CUDA.*Detectron2 main"):
            train_module.run(args)
