"""Train with the project's `Trainer` on two CPU processes (gloo), as Detectron2 main's
`launch` does without GPUs (v0.6's `launch` needs CUDA for that):

    python gloo_train.py PORT [--resume] CONFIG KEY VALUE ...

The resume tests run it in a subprocess (with this folder's sitecustomize: a SIGKILL of the
whole process group mid-run)."""
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank, world_size, port, resume, config, opts):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    torch.set_num_threads(1)
    from detectron2.utils.env import seed_all_rng

    from projects.config import load_config
    from projects.engine import Trainer

    cfg = load_config(config, opts)
    cfg.freeze()
    seed_all_rng(cfg.SEED + rank)  # as Detectron2's default_setup
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=resume)
    trainer.train()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    port, argv = int(sys.argv[1]), sys.argv[2:]
    resume = argv[0] == "--resume"
    if resume:
        argv = argv[1:]
    mp.start_processes(_worker, nprocs=2, start_method="spawn",
                       args=(2, port, resume, argv[0], argv[1:]))
