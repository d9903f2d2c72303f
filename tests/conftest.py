"""Shared fixtures: tiny sizes so that the whole suite runs in minutes on 2 CPU cores."""

from __future__ import annotations

import pytest
import torch

TINY_CHANNELS = (4, 8, 16, 32)


@pytest.fixture(scope="session")
def template_dir(tmp_path_factory):
    """A stand-in for the MNI template (the real one needs nilearn): a 56^3 1-mm 'brain', white matter inside radius
    14, grey matter to 22, ventricles (neither) inside radius 4, under the template's file names."""
    import nibabel as nib
    import numpy as np

    from dmaf_components.data.anatomy import TEMPLATE_FILES

    folder = tmp_path_factory.mktemp("template")
    g = np.meshgrid(*[np.arange(56.0) - 27.5] * 3, indexing="ij")
    r = np.sqrt(sum(a**2 for a in g))
    wm = ((r > 4) & (r < 14)) * 255.0
    gm = ((r >= 14) & (r < 22)) * 255.0
    for key, arr in (("t1", wm * 0.9 + gm * 0.6), ("gm", gm), ("wm", wm)):
        nib.save(nib.Nifti1Image(arr.astype(np.float32), np.eye(4)), str(folder / TEMPLATE_FILES[key]))
    return str(folder)


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
