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


@pytest.fixture(scope="session")
def tiny_brats(tmp_path_factory):
    """Six tiny synthetic BraTS2020 cases (48 x 48 x 32) in the release layout."""
    from dmaf_components.data import synthesize_brats

    root = tmp_path_factory.mktemp("brats")
    synthesize_brats(str(root), cases=6, shape=(48, 48, 32), seed=1)
    return root


@pytest.fixture(scope="session")
def tiny_myops(tmp_path_factory):
    from dmaf_components.data import synthesize_myops

    root = tmp_path_factory.mktemp("myops")
    synthesize_myops(str(root), cases=5, shape=(64, 64, 3), seed=1)
    return root
