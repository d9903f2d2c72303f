"""`--patch_sampling foreground`: training patches centred on the tumour at the asked rate (MONAI's
RandCropByPosNegLabeld), uniform patches as before by default, one-line errors for bad values, and a training epoch
through the bundle's own loader with foreground patches."""

from __future__ import annotations

import os
import re
import shutil

import pytest
import torch

BUNDLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundle")


def _augmentation(**overrides):
    from monai.bundle import ConfigParser
    from monai.transforms import Compose

    parser = ConfigParser()
    parser.read_config(os.path.join(BUNDLE, "configs", "train.json"))
    parser.update({"roi_size": [16, 16, 16], **overrides})
    return Compose(parser.get_parsed_content("train#augmentation"))


def _tumour_share(transform, draws=200):
    """Share of patches that hold tumour, from a 64^3 case whose tumour is one 4^3 block."""
    label = torch.zeros(1, 64, 64, 64)
    label[0, 30:34, 30:34, 30:34] = 1
    image = torch.rand(4, 64, 64, 64) + 0.1
    hits = 0
    for i in range(draws):
        transform.set_random_state(i)
        out = transform({"image": image, "label": label, "modality_mask": torch.ones(4, dtype=torch.bool)})
        out = out[0] if isinstance(out, list) else out
        assert tuple(out["image"].shape) == (4, 16, 16, 16)
        hits += bool(out["label"].sum() > 0)
    return hits / draws


def test_foreground_patches_at_the_asked_rate_uniform_by_default():
    uniform = _tumour_share(_augmentation())  # chance alone: about (19/49)^3 = 6 %
    half = _tumour_share(_augmentation(patch_sampling="foreground", foreground_ratio=0.5))
    most = _tumour_share(_augmentation(patch_sampling="foreground", foreground_ratio=0.9))
    assert uniform < 0.15
    assert 0.4 < half < 0.7 and most > 0.85


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"patch_sampling": "fg"}, "--patch_sampling: expected one of"),
        (
            {"patch_sampling": "foreground", "foreground_ratio": 1.5},
            r"--foreground_ratio: expected a number in \[0, 1\]",
        ),
    ],
)
def test_bad_values_are_one_line_errors(overrides, message):
    from dmaf_components.errors import DMAFConfigError

    with pytest.raises(Exception) as info:
        _augmentation(**overrides)
    chain, exc = [], info.value
    while exc is not None:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    assert any(isinstance(e, DMAFConfigError) for e in chain)  # a setting, not data
    assert any(re.search(message, str(e)) for e in chain)


def test_an_epoch_with_foreground_patches_through_the_bundle_loader(tiny_brats, tmp_path):
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    from dmaf_components.data import build_datalist, write_datalist

    data = tmp_path / "brats"
    shutil.copytree(tiny_brats, data)
    write_datalist(build_datalist(str(data), "brats", split=(4, 1, 1), seed=0), str(data / "datalist.json"))
    wf = ConfigWorkflow(
        config_file=os.path.join(BUNDLE, "configs", "train.json"),
        workflow_type="train",
        dataset_dir=str(data),
        bundle_root=str(tmp_path / "root"),
        max_epochs=1,
        val_interval=1,
        roi_size=[32, 32, 32],
        channels=[4, 8, 16, 32],
        num_layers=1,
        num_workers=0,
        patch_sampling="foreground",
        foreground_ratio=1.0,
    )
    wf.initialize()
    trainer = wf.parser.get_parsed_content("train#trainer")
    shapes, tumour = [], []

    @trainer.on(Events.ITERATION_STARTED)  # the collated batch (MONAI decollates it after the iteration)
    def _look(engine):
        shapes.append(tuple(engine.state.batch["image"].shape))
        tumour.append(bool(engine.state.batch["label"].sum() > 0))

    wf.run()
    assert trainer.state.iteration == 4 and shapes == [(1, 4, 32, 32, 32)] * 4
    assert all(tumour)  # foreground_ratio 1: every patch holds tumour
