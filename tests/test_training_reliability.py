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

    wf = ConfigWorkflow(
        config_file=os.path.join(BUNDLE, "configs", "train.json"),
        workflow_type="train",
        dataset_dir=str(data),
        bundle_root=str(root),
        **{**OVERRIDES, **overrides},
    )
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


@pytest.mark.slow
def test_inf_in_a_training_image_stops_training_with_one_line_and_saves_nothing_non_finite(data3, tmp_path):
    # the 4th training sample (2nd iteration of epoch 2) gets inf voxels, after the loader's checks
    inject = (
        "$@load_transforms + @train#augmentation + [monai.transforms.Lambdad('image', "
        "lambda x, n=[]: x + (float('inf') if n.append(0) or len(n) == 4 else 0.0))]"
    )
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        "configs/train.json",
        "--dataset_dir",
        str(data3),
        "--bundle_root",
        str(tmp_path),
        "--epochs",
        "3",
        "--val_interval",
        "1",
        "--train#preprocessing#transforms",
        inject,
    ] + SMALL
    proc = subprocess.run(cmd, cwd=BUNDLE, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-3000:]
    lines = [line for line in log.splitlines() if "Non-finite loss at iteration 4 (epoch 2): loss/total=" in line]
    assert lines and "Training stopped before the optimizer step" in lines[0], log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    assert proc.stderr.strip().splitlines()[-1].endswith(lines[0][lines[0].index("Non-finite") :])  # the last line
    saved = sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / "models" / "*.pt")))
    assert saved == ["checkpoint_epoch=1.pt", "model.pt"], saved  # no final checkpoint of the failed iteration
    from dmaf_components.handlers import non_finite_entries

    for name in saved:
        assert non_finite_entries({name: _load(tmp_path / "models" / name)}) == [], name


def test_savers_refuse_non_finite_weights_even_on_an_exception(tmp_path):
    from ignite.engine import Engine, Events

    from dmaf_components.handlers import FiniteCheckpointSaver, NonFiniteError

    net = torch.nn.Linear(2, 2)
    saver = FiniteCheckpointSaver(
        str(tmp_path), {"model": net}, save_final=True, final_filename="final.pt", save_interval=1
    )
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


@pytest.mark.slow
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


# --- reliability, round 3: settings compared on resume, earlier trainings kept, one-line refusals ---------------------


@pytest.fixture(scope="module")
def finished(data3, tmp_path_factory):
    """A finished one-epoch training (no validation): models/ holds model.pt and its checkpoints."""
    root = tmp_path_factory.mktemp("finished")
    _train(data3, root, max_epochs=1)
    return root


def _digests(folder):
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _refused(data3, root, **overrides):
    """Build and run the training in this process; return the one line it ends with (BundleExit: SystemExit)."""
    with pytest.raises(SystemExit) as info:
        _workflow(data3, root, **overrides).run()
    return str(info.value.code)


def test_resume_with_a_larger_max_epochs_and_a_new_learning_rate_trains_on_at_a_non_zero_rate(
    data3, finished, tmp_path
):
    root = tmp_path / "root"
    shutil.copytree(finished / "models", root / "models")
    before = _load(root / "models" / "model.pt")
    ckpt = str(root / "models" / "checkpoint_final.pt")
    assert float(_load(ckpt)["optimizer"]["param_groups"][0]["lr"]) == 0.0  # where the 1-epoch schedule ended
    log = _train(data3, root, resume_from=ckpt, max_epochs=2, learning_rate=1e-3)
    rate = 1e-3 * (1 - 1 / 2) ** 0.9  # PolynomialLR at epoch 1 of 2 from the new rate: 0.0005359
    assert any(
        f"Resume: epochs 1 in the checkpoint, 2 now; learning_rate 0.0002 in the checkpoint, 0.001 now: "
        f"the learning-rate schedule (PolynomialLR) follows the new settings; learning rate {rate:.4g} from "
        "epoch 2." in line
        for line in log
    ), log
    final = _load(root / "models" / "checkpoint_final.pt")
    assert final["trainer"]["iteration"] == 4
    assert final["lr_scheduler"]["total_iters"] == 2 and final["lr_scheduler"]["base_lrs"] == [1e-3]
    after = _load(root / "models" / "model.pt")
    moved = [k for k in before if before[k].is_floating_point() and not torch.equal(before[k], after[k])]
    assert len(moved) > len(before) // 2, "the resumed epoch did not train (learning rate 0?)"
    # an unchanged resume stays exact: the settings equal the checkpoint's, nothing is recomputed
    digests = _digests(root / "models")
    line = _refused(data3, root, resume_from=str(root / "models" / "checkpoint_final.pt"), max_epochs=1)
    assert line == (
        f"{root / 'models' / 'checkpoint_final.pt'}: epochs 1 is below the 2 epochs the checkpoint has "
        "trained (epochs 2 when it was saved); pass --epochs 3 or more to train on"
    )
    assert _digests(root / "models") == digests  # no final checkpoint of the refused run


def test_resume_from_a_checkpoint_that_does_not_fit_is_one_line_and_writes_nothing(data3, finished, tmp_path):
    ckpt = finished / "models" / "checkpoint_final.pt"
    truncated, plain = tmp_path / "truncated.pt", finished / "models" / "model.pt"
    truncated.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    digests = _digests(finished / "models")
    cases = {
        "channels": (
            {"resume_from": str(ckpt), "channels": [8, 16, 32, 64]},
            f"{ckpt}: checkpoint does not fit the network: channels [4,8,16,32] in the checkpoint vs "
            '[8,16,32,64] in the network; run with --channels "[4,8,16,32]"',
        ),
        "truncated": ({"resume_from": str(truncated)}, f"{truncated}: checkpoint is truncated or corrupt ("),
        "weights only": (
            {"resume_from": str(plain)},
            f"{plain}: not a training checkpoint: it holds network weights only (362 tensors, as "
            "models/model.pt); --resume_from takes a models/checkpoint_*.pt, which holds model, loss, "
            "optimizer, lr_scheduler, trainer, dtm, random_state, model_saver",
        ),
        "batch size": (
            {"resume_from": str(ckpt), "batch_size": 2},
            f"{ckpt}: its epochs have 2 iterations, this run's 1 (another datalist, batch_size or number of processes)",
        ),
    }
    for name, (overrides, message) in cases.items():
        root = tmp_path / name.replace(" ", "_")
        line = _refused(data3, root, max_epochs=3, **overrides)
        assert line.startswith(message), (name, line)
        assert not list((root / "models").iterdir()), name  # nothing written
    assert _digests(finished / "models") == digests


def test_training_into_a_folder_of_an_earlier_training_is_refused_unless_overwrite(data3, finished, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(finished / "models", root / "models")
    digests = _digests(root / "models")
    models = root / "models"
    line = _refused(data3, root, max_epochs=1)
    assert line == (
        f"ckpt_dir {models}: holds 3 file(s) of an earlier training (checkpoint_epoch=1.pt, "
        "checkpoint_final.pt, model.pt); they are kept: pass --overwrite true to replace them, "
        f"--resume_from {models}/checkpoint_final.pt to continue that training, or choose another "
        "--bundle_root"
    )
    assert _digests(models) == digests
    log = _train(data3, root, max_epochs=1, seed=1, overwrite="true")
    assert any("model.pt holds the final weights" in line for line in log)
    assert _digests(models)["model.pt"] != digests["model.pt"]


def test_a_checkpoint_loader_of_another_program_may_train_into_the_folder_it_loads_from(tmp_path):
    """MONAI Label's train task inserts a CheckpointLoader for models/model.pt and writes the fine-tuned model back:
    not refused. Without a loader, or with a bad max_epochs, the preflight refuses with one line."""
    from ignite.engine import Engine
    from monai.handlers import CheckpointLoader

    from dmaf_components.handlers.reliability import TrainingPreflight

    (tmp_path / "models").mkdir()
    torch.save({"w": torch.zeros(1)}, tmp_path / "models" / "model.pt")
    preflight = TrainingPreflight(str(tmp_path / "models"), "", False, 2)
    fine_tuning = Engine(lambda e, b: None)
    CheckpointLoader(str(tmp_path / "models" / "model.pt"), {"w": torch.nn.Linear(1, 1)}).attach(fine_tuning)
    preflight.attach(fine_tuning)
    with pytest.raises(SystemExit, match="holds 1 file\\(s\\) of an earlier training \\(model.pt\\)"):
        preflight.attach(Engine(lambda e, b: None))
    preflight.check()  # in initialize: the folder is checked only in a `python -m monai.bundle` process
    for bad in (0, -1, 2.5, "abc", True):
        with pytest.raises(SystemExit, match=f"^epochs: expected a whole number of epochs >= 1 .*got {bad!r}$"):
            TrainingPreflight(str(tmp_path / "new"), "", False, bad).check()
    with pytest.raises(SystemExit, match="^overwrite: expected true or false, got 'maybe'$"):
        TrainingPreflight(str(tmp_path / "models"), "", "maybe", 2).check()


def test_a_data_error_in_training_ends_with_its_one_line_other_errors_keep_their_traceback():
    from ignite.engine import Engine
    from monai.handlers import StatsHandler

    from dmaf_components.data import DMAFDataError
    from dmaf_components.handlers.reliability import OneLineExit, one_line_message

    def engine_raising(exc):
        def step(engine, batch):
            raise exc

        engine = Engine(step)
        OneLineExit().attach(engine)
        StatsHandler(iteration_log=False, epoch_log=False).attach(engine)  # logs a traceback and re-raises
        return engine

    def wrapped(message):  # as MONAI's apply_transform wraps a transform's error
        try:
            raise DMAFDataError(message)
        except DMAFDataError as e:
            try:
                raise RuntimeError("applying transform <ModalityDropd>") from e
            except RuntimeError as outer:
                return outer

    with pytest.raises(SystemExit) as info:
        engine_raising(wrapped("c1: modality_mask has 3 entries, expected 4")).run([0], max_epochs=1)
    assert info.value.code == "c1: modality_mask has 3 entries, expected 4"
    with pytest.raises(ZeroDivisionError):
        engine_raising(ZeroDivisionError("a bug")).run([0], max_epochs=1)
    alone = Engine(lambda e, b: 1 / 0)  # the only exception handler: other errors still reach the caller
    OneLineExit().attach(alone)
    with pytest.raises(ZeroDivisionError):
        alone.run([0], max_epochs=1)
    worker = RuntimeError(
        "Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
        "last):\n...\ndmaf_components.data.constants.DMAFDataError: c2: f.nii.gz: file not found\n"
    )
    assert one_line_message(worker) == "c2: f.nii.gz: file not found"
    assert one_line_message(ValueError("x")) is None


@pytest.mark.slow
def test_command_line_refusals_end_with_one_line(data3, finished, tmp_path):
    """Through ``python -m monai.bundle run training``: exit status 1 and the cause as the last line, before any
    data is read where the cause is a setting."""
    import json

    cases = {
        "epochs 0": (
            ["--epochs", "0"],
            "epochs: expected a whole number of epochs >= 1 (--epochs; --max_epochs is its old name), got 0",
        ),
        "epochs -3": (["--epochs", "-3"], "epochs: expected a whole number of epochs >= 1"),
        "old and new name": (
            ["--max_epochs", "-3"],
            "--max_epochs -3 and --epochs 1 set the same key (max_epochs is the old name of epochs): "
            "give only --epochs",
        ),
        "earlier training": (
            ["--bundle_root", str(finished)],
            f"ckpt_dir {finished / 'models'}: holds 3 file(s) of an earlier training",
        ),
    }
    datalist = json.loads((data3 / "datalist.json").read_text())
    datalist["training"][0]["modality_mask"] = [1, 0, 1]
    (tmp_path / "short_mask.json").write_text(json.dumps(datalist))
    cases["modality_mask of 3"] = (["--data_list_file_path", str(tmp_path / "short_mask.json")], "modality_mask")
    shutil.copytree(data3, tmp_path / "data")
    import nibabel as nib

    listed = datalist["training"][0]["label"]
    label = tmp_path / "data" / (os.path.relpath(listed, data3) if os.path.isabs(listed) else listed)

    img = nib.load(str(label))
    nib.save(nib.Nifti1Image(img.get_fdata()[:-1].astype("uint8"), img.affine), str(label))
    case = label.name[: -len("_seg.nii.gz")]
    cases["label 1 voxel short"] = (
        ["--dataset_dir", str(tmp_path / "data")],
        f"{case}: {label}: shape (47, 48, 32) differs from {case}_flair.nii.gz (48, 48, 32)",
    )
    for name, (args, message) in cases.items():
        cmd = (
            [
                sys.executable,
                "-m",
                "monai.bundle",
                "run",
                "training",
                "--config_file",
                "configs/train.json",
                "--dataset_dir",
                str(data3),
                "--bundle_root",
                str(tmp_path / name.replace(" ", "_")),
                "--epochs",
                "1",
            ]
            + SMALL
            + args
        )
        proc = subprocess.run(cmd, cwd=BUNDLE, capture_output=True, text=True, timeout=600)
        log = proc.stdout + proc.stderr
        assert proc.returncode == 1, (name, log[-3000:])
        assert "Traceback" not in log, (name, log[-3000:])
        last = proc.stderr.strip().splitlines()[-1]
        assert message in last, (name, last)


def test_a_refused_or_failed_start_writes_no_final_checkpoint(tmp_path):
    """A resume refused at its start (a data error, a BundleExit) must not save the state it did not restore as
    checkpoint_final.pt, over the checkpoint it was given."""
    from ignite.engine import Engine, Events

    from dmaf_components.data import DMAFDataError
    from dmaf_components.handlers import FiniteCheckpointSaver
    from dmaf_components.inference import BundleExit

    for exc in (DMAFDataError("ckpt.pt: checkpoint is truncated or corrupt"), BundleExit("refused")):
        engine = Engine(lambda e, b: None)
        FiniteCheckpointSaver(
            str(tmp_path), {"model": torch.nn.Linear(2, 2)}, save_final=True, final_filename="final.pt"
        ).attach(engine)

        def refuse(_, exc=exc):
            raise exc

        engine.add_event_handler(Events.STARTED, refuse)
        with pytest.raises(type(exc)):
            engine.run([0], max_epochs=1)
        assert os.listdir(tmp_path) == [], type(exc)
    engine = Engine(lambda e, b: 1 / 0)  # any other failure still leaves its final checkpoint, as MONAI's saver does
    FiniteCheckpointSaver(
        str(tmp_path), {"model": torch.nn.Linear(2, 2)}, save_final=True, final_filename="final.pt"
    ).attach(engine)
    with pytest.raises(ZeroDivisionError):
        engine.run([0], max_epochs=1)
    assert os.listdir(tmp_path) == ["final.pt"]


def test_every_kind_of_error_ends_in_its_one_line():
    """The four kinds (data, config, checkpoint, run) are DMAFErrors: each is the one line of a wrapped failure,
    also when a loader worker passed it on as text, and the CLI and the bundle catch them all."""
    from dmaf_components.errors import (
        DMAFCheckpointError,
        DMAFConfigError,
        DMAFDataError,
        DMAFError,
        DMAFRunError,
        one_line_message,
    )

    for kind in (DMAFDataError, DMAFConfigError, DMAFCheckpointError, DMAFRunError):
        assert issubclass(kind, DMAFError)
        try:
            try:
                raise kind("m.pt: the cause")
            except DMAFError as inner:
                raise RuntimeError("applying transform") from inner
        except RuntimeError as wrapped:
            assert one_line_message(wrapped) == "m.pt: the cause"
        text = RuntimeError(f"Caught in DataLoader worker process 0.\nTraceback...\n{kind.__name__}: m.pt: the cause")
        assert one_line_message(text) == "m.pt: the cause"
    assert not issubclass(DMAFCheckpointError, DMAFDataError)  # a checkpoint is not data
