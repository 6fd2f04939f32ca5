"""Suite-wide settings."""
import os

import torch

# Tiny models gain little from a second intra-op thread, and when the machine is busy
# (parallel jobs, loader workers) OpenMP threads spinning against each other made a tiny conv
# ~10x slower than one thread. Override with TEST_NUM_THREADS.
torch.set_num_threads(int(os.environ.get("TEST_NUM_THREADS", "1")))


# Tests that take a `device` argument run once per available device: "cpu", and "cuda" where
# a GPU is visible (tools/gpu_check.sh runs the suite there).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", DEVICES)
