"""Test-wide settings: small tensors run fastest single-threaded, and the CI machine has two cores
shared with the processes the system tests start."""

import torch

torch.set_num_threads(1)
