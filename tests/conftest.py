"""Shared fixtures: tiny Qwen3.5-MoE checkpoints and their conversions, built once per session."""

from __future__ import annotations

import torch

# CI machines have 2 cores; more threads only add contention
torch.set_num_threads(2)
