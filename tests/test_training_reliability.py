"""Training reliability (issues 11.1, 11.5, 12.A): a non-finite loss stops training and nothing non-finite is saved;
a resumed training ends bitwise equal to the uninterrupted one; a short training still leaves a model.pt."""

from __future__ import annotations

import glob
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch
from test_bundle import BUNDLE, TINY

# two training cases (2 iterations an epoch), one validation case
SMALL = TINY + ["--num_heads", "2"]
OVERRIDES = {"roi_size": [32, 32, 32], "channels": [4, 8, 16, 32], "num_layers": 1, "num_heads": 2, "num_workers": 0}


@pytest.fixture(scope="module")
def data3(tiny_brats, tmp_path_factory):
    data = tmp_path_factory.mktemp("reliability_data") / "brats"
    shutil.copytree(tiny_brats, data)
    from dmaf_components.data import build_datalist, write_datalist

    write_datalist(build_datalist(str(data), "brats", split=(2, 1, 3), seed=0), str(data / "datalist.json"))
    return data


def _workflow(data, root, **overrides):
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(config_file=os.path.join(BUNDLE, "configs", "train.json"), workflow_type="train",
                        dataset_dir=str(data), bundle_root=str(root), **{**OVERRIDES, **overrides})
    wf.initialize()
    return wf


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _train(data, root, interrupt_at=None, **overrides):
    """Run the bundle's training in this process and return the trainer's log lines; ``interrupt_at``: raise when
    that iteration starts (a kill)."""
    from ignite.engine import Events

    wf = _workflow(data, root, **overrides)
    records = _Records()
    wf.parser.get_parsed_content("train#trainer").logger.addHandler(records)
    if interrupt_at is None:
        wf.run()
    else:
        trainer = wf.parser.get_parsed_content("train#trainer")

        def _kill(engine):
            raise KeyboardInterrupt(f"simulated kill at iteration {engine.state.iteration}")

        trainer.add_event_handler(Events.ITERATION_STARTED(once=interrupt_at), _kill)
        with pytest.raises(KeyboardInterrupt):
            wf.run()
    wf.finalize()
    wf.parser.get_parsed_content("train#trainer").logger.removeHandler(records)
    return records.lines


def _assert_equal(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _assert_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{where}.{i}")
    else:
        assert a == b, where


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_inf_in_a_training_image_stops_training_with_one_line_and_saves_nothing_non_finite(data3, tmp_path):
    # the 4th training sample (2nd iteration of epoch 2) gets inf voxels, after the loader's checks
    inject = ("$@load_transforms + @train#augmentation + [monai.transforms.Lambdad('image', "
              "lambda x, n=[]: x + (float('inf') if n.append(0) or len(n) == 4 else 0.0))]")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "configs/train.json",
           "--dataset_dir", str(data3), "--bundle_root", str(tmp_path), "--max_epochs", "3", "--val_interval", "1",
           "--train#preprocessing#transforms", inject] + SMALL
    proc = subprocess.run(cmd, cwd=BUNDLE, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-3000:]
    lines = [line for line in log.splitlines() if "Non-finite loss at iteration 4 (epoch 2): loss/total=" in line]
    assert lines and "Training stopped before the optimizer step" in lines[0], log[-3000:]
    saved = sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / "models" / "*.pt")))
    assert saved == ["checkpoint_epoch=1.pt", "model.pt"], saved  # no final checkpoint of the failed iteration
    from dmaf_components.handlers import non_finite_entries

    for name in saved:
        assert non_finite_entries({name: _load(tmp_path / "models" / name)}) == [], name


def test_savers_refuse_non_finite_weights_even_on_an_exception(tmp_path):
    from ignite.engine import Engine, Events

    from dmaf_components.handlers import FiniteCheckpointSaver, NonFiniteError

    net = torch.nn.Linear(2, 2)
    saver = FiniteCheckpointSaver(str(tmp_path), {"model": net}, save_final=True, final_filename="final.pt",
                                  save_interval=1)
    engine = Engine(lambda e, b: None)
    saver.attach(engine)

    @engine.on(Events.ITERATION_COMPLETED(once=3))
    def _poison(_):
        with torch.no_grad():
            net.weight[0, 0] = float("nan")

    with pytest.raises(NonFiniteError, match="non-finite values in model.weight"):
        engine.run([0, 1], max_epochs=2)  # epoch 1 is saved; epoch 2 and the final save after the error are not
    assert sorted(os.listdir(tmp_path)) == ["model_epoch=1.pt"]


def test_amp_tolerates_a_few_non_finite_losses_then_stops():
    from types import SimpleNamespace

    from dmaf_components.handlers import NonFiniteError, NonFiniteLossHandler

    handler = NonFiniteLossHandler(amp_patience=3, name="test")
    state = SimpleNamespace(output={"loss": torch.tensor(float("nan"))}, iteration=1, epoch=1)
    engine = SimpleNamespace(amp=True, scaler=object(), state=state, loss_function=None)
    handler(engine)
    handler(engine)  # two skipped steps
    state.output["loss"] = torch.tensor(1.0)
    handler(engine)  # a finite loss resets the count
    state.output["loss"] = torch.tensor(float("inf"))
    handler(engine)
    handler(engine)
    with pytest.raises(NonFiniteError, match="in 3 consecutive AMP iterations: loss=inf"):
        handler(engine)
    engine.amp = False
    handler.consecutive = 0
    with pytest.raises(NonFiniteError, match="^Non-finite loss at iteration 1 \\(epoch 1\\): loss=inf"):
        handler(engine)  # without AMP the first one stops training


def test_resume_after_a_kill_is_bitwise_equal_per_epoch_with_0_and_mid_epoch_with_1_worker(data3, tmp_path):
    common = {"max_epochs": 2, "val_interval": 1, "save_every_iterations": 1}
    _train(data3, tmp_path / "full", **common)
    _train(data3, tmp_path / "killed", interrupt_at=4, **common)  # killed in iteration 4 of 4 (2 of epoch 2)
    killed = tmp_path / "killed" / "models"
    reference = _load(tmp_path / "full" / "models" / "checkpoint_final.pt")
    for name, workers in (("checkpoint_epoch=1.pt", 0), ("checkpoint_iteration=3.pt", 1)):
        root = tmp_path / f"resumed_{name}"
        shutil.copytree(killed, root / "models")  # as left by the kill: model.pt of epoch 1, last checkpoints
        log = _train(data3, root, resume_from=str(root / "models" / name), **{**common, "train_num_workers": workers})
        iteration = 2 if workers == 0 else 3
        assert any(f"at epoch 1, iteration {iteration}" in line and name in line for line in log), log
        # model, optimizer, loss, DTM, scheduler, trainer, random state and best-model tracking: all bitwise equal
        _assert_equal(_load(root / "models" / "checkpoint_final.pt"), reference, f"{name}, {workers} workers")
        _assert_equal(_load(root / "models" / "model.pt"), _load(tmp_path / "full" / "models" / "model.pt"))


def test_one_epoch_without_validation_leaves_the_final_weights_as_model_pt(data3, tmp_path):
    from dmaf_components.networks import DMAFNet

    log = _train(data3, tmp_path, max_epochs=1)  # val_interval 10: no validation
    assert any("model.pt holds the final weights (epoch 1, iteration 2)" in line for line in log), log
    state = _load(tmp_path / "models" / "model.pt")
    DMAFNet(3, 4, 4, channels=(4, 8, 16, 32), num_layers=1, num_heads=2).load_state_dict(state, strict=True)
    _assert_equal(state, _load(tmp_path / "models" / "checkpoint_final.pt")["model"])
