"""Every-combination evaluation (paper Table 2) on MONAI's SupervisedEvaluator: same numbers as the hand-written loop
it replaced, progress output, and multi-process evaluation (gloo) writing the same table as one process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

BUNDLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundle")
CONFIGS = [os.path.join(BUNDLE, "configs", c) for c in ("train.json", "evaluate.json")]
TINY = {"roi_size": [32, 32, 32], "channels": [4, 8, 16, 32], "num_layers": 1, "num_workers": 0}
TINY_ARGS = ["--roi_size", "[32,32,32]", "--channels", "[4,8,16,32]", "--num_layers", "1", "--num_workers", "0"]


@pytest.fixture(scope="module")
def data_dir(tiny_brats, tmp_path_factory):
    """Two test cases; ``datalist_missing.json`` drops the second one's T2 file (combinations without it skip)."""
    from dmaf_components.data import build_datalist, write_datalist

    data = tmp_path_factory.mktemp("evaluation_data") / "brats"
    shutil.copytree(tiny_brats, data)
    datalist = build_datalist(str(data), "brats", split=(3, 1, 2), seed=0)
    write_datalist(datalist, str(data / "datalist.json"))
    del datalist["testing"][1]["image"]["t2"]
    write_datalist(datalist, str(data / "datalist_missing.json"))
    return data


@pytest.fixture(scope="module")
def bundle_root(tmp_path_factory):
    """A randomly initialised tiny DMAF-Net as ``models/model.pt`` (evaluation needs weights, not a good model)."""
    from dmaf_components.networks import DMAFNet

    root = tmp_path_factory.mktemp("evaluation_root")
    torch.manual_seed(0)
    net = DMAFNet(3, 4, 4, channels=tuple(TINY["channels"]), num_layers=1)
    (root / "models").mkdir()
    torch.save(net.state_dict(), root / "models" / "model.pt")
    return root


class _ThresholdNet(torch.nn.Module):
    """Deterministic stand-in for a trained network: the class follows the mean intensity of the present
    modalities, so that combinations differ, some predict no ET (undefined HD95) and some a small one (ET
    post-processing)."""

    def forward(self, x: torch.Tensor, modality_mask: torch.Tensor) -> torch.Tensor:
        m = modality_mask.to(x.dtype).reshape(*modality_mask.shape, *([1] * (x.ndim - 2)))
        s = (x * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp_min(1)
        return torch.cat([-((s - c) ** 2) for c in (0.0, 1.0, 2.0, 3.2)], 1)


def _reference(network, dataloader, inferer, modalities, regions, variants, et_min_voxels=500):
    """The hand-written loop that ``CombinationEvaluation.run`` (releases up to 0.1.2) was, kept as the reference:
    per case and combination, zero the absent channels, infer, argmax, regions, MONAI Dice/HD95 with the image's
    spacing, the BraTS rule for empty regions applied from the masks; returns the per-case lists (the tables are
    checked from these with numpy)."""
    from monai.metrics import DiceMetric, HausdorffDistanceMetric

    from dmaf_components.evaluation import combination_name, modality_combinations, suppress_small_et
    from dmaf_components.inferers import study_modality_mask

    def to_regions(label):
        return torch.cat([torch.isin(label, torch.as_tensor(c)) for c in regions.values()], 1).float()

    combos = modality_combinations(len(modalities))
    metrics = {
        c: {
            v: (
                DiceMetric(include_background=True, reduction="none", ignore_empty=False),
                HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none"),
            )
            for v in variants
        }
        for c in combos
    }
    empties = {c: {v: [] for v in variants} for c in combos}
    cases = 0
    with torch.no_grad():
        for batch in dataloader:
            image, label = torch.as_tensor(batch["image"]), torch.as_tensor(batch["label"])
            available = batch.get("image_available")
            available = study_modality_mask(image) if available is None else torch.as_tensor(available).bool()
            available = available.reshape(1, -1)
            spacing = batch["image"].pixdim[0]
            spacing = [float(v) for v in torch.as_tensor(spacing).flatten()[: image.ndim - 2]]
            gt = to_regions(label)
            cases += 1
            for combo in combos:
                mask = torch.tensor(combo)[None] & available
                if not mask.any():
                    continue
                x = image * mask.reshape(1, -1, *([1] * (image.ndim - 2))).to(image.dtype)
                pred = torch.as_tensor(inferer(x, network, modality_mask=mask)).argmax(1, keepdim=True)
                for variant in variants:
                    p = suppress_small_et(pred, min_voxels=et_min_voxels) if variant != "raw" else pred
                    dice, hd = metrics[combo][variant]
                    dice(to_regions(p), gt)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        hd(to_regions(p), gt, spacing=spacing)
                    p_empty = to_regions(p).flatten(2).sum(2)[0] == 0
                    g_empty = gt.flatten(2).sum(2)[0] == 0
                    empties[combo][variant].append([int(a) + 2 * int(b) for a, b in zip(p_empty, g_empty)])
    names = list(regions)
    per_case = {}
    for variant in variants:
        per_case[variant] = {}
        for combo in combos:
            dice, hd = metrics[combo][variant]
            d = dice.get_buffer() if dice.get_buffer() is not None else torch.empty(0, len(names))
            h = hd.get_buffer() if hd.get_buffer() is not None else torch.empty(0, len(names))
            e = torch.tensor(empties[combo][variant], dtype=torch.long).reshape(-1, len(names))
            # the BraTS rule, applied here from the masks themselves: 373.13 mm when exactly one side is empty, 0
            # when both are
            h = torch.where((e == 1) | (e == 2), torch.full_like(h, 373.13), h)
            h = torch.where(e == 3, torch.zeros_like(h), h)
            per_case[variant][combination_name(combo, modalities)] = {
                "dice": (d * 100).tolist(),
                "hd95": torch.where(torch.isfinite(h), h, torch.nan).tolist(),
                "empty": e.tolist(),
            }
    return {"cases": cases, "per_case": per_case}


def _parser(**overrides):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(CONFIGS + list(overrides.pop("extra_configs", [])))
    parser.update({**TINY, "device": "$torch.device('cpu')", **overrides})
    return parser


def test_per_case_values_equal_the_reference_loop(data_dir, tmp_path):
    """Same per-case values, bit for bit, as the hand-written loop (BraTS rule for empty regions), with a case that
    lacks a modality; every table entry is the plain mean of its per-case values and counts the empty pairs."""
    parser = _parser(
        dataset_dir=str(data_dir),
        datalist=str(data_dir / "datalist_missing.json"),
        bundle_root=str(tmp_path),
        network=_ThresholdNet(),
    )
    evaluator = parser.get_parsed_content("evaluator")
    evaluator.run()
    written = json.load(open(tmp_path / "eval" / "evaluation.json"))
    reference = _reference(
        _ThresholdNet(),
        parser.get_parsed_content("evaluation#dataloader"),
        parser.get_parsed_content("validate#inferer"),
        parser["modalities"],
        parser.get_parsed_content("regions"),
        ["raw", "et_postprocessed"],
    )
    assert json.dumps(written["per_case"]) == json.dumps(reference["per_case"])  # NaN included, same order
    assert written["cases"] == 2 and len(written["per_case"]["raw"]["t2"]["dice"]) == 1  # case 2 has no T2
    assert len(written["per_case"]["raw"]["flair+t2"]["dice"]) == 2  # evaluated there with FLAIR alone
    for variant, rows in written["tables"].items():
        for row in rows[:-1]:
            values = reference["per_case"][variant][row["combination"]]
            for r, region in enumerate(written["regions"]):
                assert row[f"dice_{region}"] == pytest.approx(np.mean(np.asarray(values["dice"])[:, r]))
                assert row[f"hd95_{region}"] == pytest.approx(np.mean(np.asarray(values["hd95"])[:, r]))
                codes = np.asarray(values["empty"])[:, r]
                assert row[f"hd95_{region}_one_empty"] == int(np.isin(codes, (1, 2)).sum())
                assert row[f"hd95_{region}_both_empty"] == int((codes == 3).sum())
                assert row[f"hd95_{region}_undefined"] == 0  # the rule defines every pair
    one_empty = sum(row["hd95_ET_one_empty"] for row in written["tables"]["raw"][:-1])
    assert 0 < one_empty < 2 * 15  # some pairs predict no ET: scored 373.13, and counted
    assert written["tables"]["raw"][-1]["hd95_ET_one_empty"] == one_empty  # the Avg. row sums the counts
    assert written["tables"]["raw"] != written["tables"]["et_postprocessed"]  # the post-processing acted
    assert 5 < written["tables"]["raw"][-1]["dice_WT"] < 100  # not a degenerate prediction
    assert evaluator.state.iteration == 2 * 15  # skipped pairs are iterations too (the progress bar's total)


@pytest.fixture(scope="module")
def single_process(data_dir, bundle_root):
    """`monai.bundle run` of evaluate.json (one process) with the random tiny network."""
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")  # both runs on CPU
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        "['configs/train.json','configs/evaluate.json']",
        "--dataset_dir",
        str(data_dir),
        "--bundle_root",
        str(bundle_root),
    ] + TINY_ARGS
    proc = subprocess.run(cmd, cwd=BUNDLE, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return bundle_root / "eval", proc.stdout + proc.stderr


@pytest.mark.slow
def test_progress_tables_and_files(single_process):
    out, log = single_process
    assert "combination x case: [30/30] 100%" in log  # 2 cases x 15 combinations
    assert "brats raw (2 cases)" in log and "brats et_postprocessed (2 cases)" in log and "Avg." in log
    assert "Epoch[1] Metrics -- dice:" in log
    result = json.load(open(out / "evaluation.json"))
    assert list(result) == ["cases", "modalities", "regions", "tables", "per_case"]
    assert list(result["tables"]) == list(result["per_case"]) == ["raw", "et_postprocessed"]
    assert len(result["tables"]["raw"]) == 16 and result["tables"]["raw"][-1]["combination"] == "Avg."
    assert np.asarray(result["per_case"]["raw"]["flair+t1+t1ce+t2"]["dice"]).shape == (2, 3)
    header = open(out / "evaluation.csv").readline().strip().split(",")
    assert header[:6] == [
        "combination",
        "dice_WT",
        "hd95_WT",
        "hd95_WT_undefined",
        "hd95_WT_one_empty",
        "hd95_WT_both_empty",
    ] and header[-2:] == ["dice_avg", "hd95_avg"]
    assert (out / "evaluation_et_postprocessed.csv").exists() and os.path.getsize(out / "evaluation_dice.png") > 1000
    raw = open(out / "metrics" / "dice_raw.csv").read().splitlines()  # MONAI MetricsSaver: one row per pair
    assert len(raw) == 1 + 30 and raw[1].split(",")[0].endswith(":flair")
    assert {"dice", "hd95"} <= {line.split(",")[0] for line in open(out / "metrics" / "metrics.csv")}


def test_multi_gpu_evaluate_config_resolves(data_dir, tmp_path):
    """multi_gpu_evaluate.json parses to an evaluator over DistributedSampler-shared cases (a 1-process group);
    --tracking mlflow adds its handler to the evaluator's handler list."""
    import torch.distributed as dist
    from monai.bundle import ConfigWorkflow
    from monai.bundle.utils import DEFAULT_MLFLOW_SETTINGS
    from monai.data import DistributedSampler

    from dmaf_components.evaluation import CombinationPairs, CombinationTables

    parser = _parser(
        extra_configs=[os.path.join(BUNDLE, "configs", "multi_gpu_evaluate.json")],
        dataset_dir=str(data_dir),
        bundle_root=str(tmp_path),
    )
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        evaluator = parser.get_parsed_content("evaluator")
        assert isinstance(evaluator.data_loader, CombinationPairs)
        assert isinstance(evaluator.data_loader.dataloader.sampler, DistributedSampler)
        assert evaluator.state.epoch_length == 2 * 15
        assert any(isinstance(h, CombinationTables) for h in parser.get_parsed_content("evaluator#val_handlers"))
    finally:
        dist.destroy_process_group()
    ConfigWorkflow.patch_bundle_tracking(parser, DEFAULT_MLFLOW_SETTINGS)
    assert parser["handlers"][-1]["_target_"] == "MLFlowHandler"


@pytest.mark.slow
def test_torchrun_two_processes_write_the_same_table(single_process, data_dir, bundle_root, tmp_path):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")  # both runs on CPU
    cmd = [
        torchrun,
        "--nproc_per_node=2",
        "--master_port",
        str(30500 + os.getpid() % 1000),
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        "['configs/train.json','configs/evaluate.json','configs/multi_gpu_evaluate.json']",
        "--dataset_dir",
        str(data_dir),
        "--bundle_root",
        str(tmp_path),
        "--ckpt_path",
        str(bundle_root / "models" / "model.pt"),
    ] + TINY_ARGS
    proc = subprocess.run(cmd, cwd=BUNDLE, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "combination x case: [15/15]" in proc.stderr  # rank 0's half of the pairs
    out, _ = single_process
    for name in ("evaluation.json", "evaluation.csv", "evaluation_et_postprocessed.csv"):
        assert open(tmp_path / "eval" / name).read() == open(out / name).read(), name


def test_multi_process_evaluation_refuses_fewer_cases_than_processes():
    """A process without a test case would skip the metric gather the others wait in (a hang): one line instead."""
    import json as _json

    from dmaf_components.data.constants import DMAFDataError
    from dmaf_components.evaluation import check_enough_cases

    check_enough_cases(2, 2)
    with pytest.raises(DMAFDataError, match="1 case\\(s\\) for 2 processes; run with --nproc_per_node=1"):
        check_enough_cases(1, 2)
    init = _json.load(open(os.path.join(BUNDLE, "configs", "multi_gpu_evaluate.json")))["initialize"]
    assert any("check_enough_cases" in line for line in init)
