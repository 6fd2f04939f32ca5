"""Two CPU processes (gloo): the project's Trainer wraps CPU models in DDP with
``device_ids=None`` and keeps the replicas identical; `train_net.py --num-gpus 2` trains and
evaluates through Detectron2's `launch` where it starts CPU workers (main), and refuses clearly
where it does not (v0.6)."""
import json
import os
import socket
import subprocess
import sys

import torch
import torch.multiprocessing as mp

from projects.testing import TINY_RCNN_OPTS, TINY_RESNET_OPTS, ddp_train_worker, repo_root

from .conftest import COMPILED_DETECTRON2, QUICKSTART, cli_opts


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


def test_train_net_num_gpus_2_on_cpu(tmp_path):
    # CPU workers even on a CUDA machine; one intra-op thread per worker
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [repo_root(), os.environ.get("PYTHONPATH")])))
    opts = cli_opts(TINY_RESNET_OPTS + TINY_RCNN_OPTS + [
        "SOLVER.IMS_PER_BATCH", 4, "SOLVER.MAX_ITER", 2, "SOLVER.WARMUP_ITERS", 1,
        "INPUT.MIN_SIZE_TEST", 64, "INPUT.MAX_SIZE_TEST", 96, "OUTPUT_DIR", tmp_path])
    cmd = [sys.executable, os.path.join(repo_root(), "train_net.py"), "--num-gpus", "2",
           "--dist-url", "auto", "--config-file", QUICKSTART, *opts]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if not COMPILED_DETECTRON2:  # the v0.6 fallback: launch() asserts CUDA for 2 processes
        assert out.returncode != 0
        assert "--num-gpus 2 without CUDA needs CPU (gloo) workers" in out.stderr
        assert "Install Detectron2 main, or run with --num-gpus 1" in out.stderr
        assert not (tmp_path / "log.txt").exists()  # refused before any worker started
        return
    assert out.returncode == 0, out.stderr[-3000:]
    log = (tmp_path / "log.txt").read_text()
    assert "World size: 2" in log
    # both workers trained the 2 iterations (Detectron2 logs the world size in each rank's log)
    assert "World size: 2" in (tmp_path / "log.txt.rank1").read_text()
    metrics = [json.loads(line) for line in (tmp_path / "metrics.json").read_text().splitlines()]
    assert [m["iteration"] for m in metrics if "total_loss" in m] == [1]  # 2nd, final one
    # evaluated on shapes_val with the compiled COCO evaluator
    assert any("bbox/AP" in m and "segm/AP" in m for m in metrics)
    assert "Evaluating predictions with unofficial COCO API" in log
    assert "Evaluation results for bbox" in log and "Evaluation results for segm" in log
    assert (tmp_path / "model_final.pth").exists()
