"""One intra-op thread for the whole suite: the tests are small and latency-bound, and a second
thread only contends with the other core's work (several tests run subprocesses)."""

import torch

torch.set_num_threads(1)
