"""Suite-wide settings."""
import os

import torch

# Tiny models gain little from a second intra-op thread, and when the machine is busy
# (parallel jobs, loader workers) OpenMP threads spinning against each other made a tiny conv
# ~10x slower than one thread. Override with TEST_NUM_THREADS.
torch.set_num_threads(int(os.environ.get("TEST_NUM_THREADS", "1")))
