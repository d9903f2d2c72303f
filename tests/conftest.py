"""Shared fixtures: tiny sizes so that the whole suite runs in minutes on 2 CPU cores."""

from __future__ import annotations

import pytest
import torch

TINY_CHANNELS = (4, 8, 16, 32)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_net_kwargs():
    return {"channels": TINY_CHANNELS, "num_layers": 1, "num_heads": 2}
