"""Test-wide settings."""

import torch

# CI has 2 cores and several tests start subprocesses; one intra-op thread per process avoids
# oversubscription (a fixture took 36 s instead of 3 s with torch's default on a busy machine).
torch.set_num_threads(1)
