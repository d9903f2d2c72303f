"""Inference that says how far to trust it (issue items 1 and 2): the evaluation writes ``quality.json`` beside the
weights (per combination and region, Dice/HD95 mean, sd, count, bound to the model by its SHA-256); inference checks
it belongs to the checkpoint and writes ``<study>_report.json`` (expected Dice, advice on missing modalities,
flags)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from dmaf_components.data import BRATS_AFFINE, brats_case
from dmaf_components.evaluation import combination_name, modality_combinations

BUNDLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundle")
INFERENCE = os.path.join(BUNDLE, "configs", "inference.json")
EVALUATION = [os.path.join(BUNDLE, "configs", c) for c in ("train.json", "evaluate.json")]
MODALITIES = ["flair", "t1", "t1ce", "t2"]
REGIONS = ["WT", "TC", "ET"]
NET = {"channels": (4, 8, 16, 32), "num_layers": 1, "num_heads": 2}
SHAPE = (32, 32, 24)
#: hand-made expected Dice: 10 + the sum of each present modality's contribution per region (WT, TC, ET)
CONTRIBUTION = {"flair": (40, 10, 5), "t1": (5, 8, 3), "t1ce": (10, 40, 30), "t2": (30, 5, 2)}


def _sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


class _ThresholdNet(torch.nn.Module):
    """Deterministic stand-in for a trained network (as in test_evaluation.py): combinations give different Dice."""

    def forward(self, x: torch.Tensor, modality_mask: torch.Tensor) -> torch.Tensor:
        m = modality_mask.to(x.dtype).reshape(*modality_mask.shape, *([1] * (x.ndim - 2)))
        s = (x * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp_min(1)
        return torch.cat([-((s - c) ** 2) for c in (0.0, 1.0, 2.0, 3.2)], 1)


def test_evaluation_writes_the_quality_table_beside_the_weights(tiny_brats, tmp_path):
    """(a) quality.json's numbers are the mean, sd (ddof 1) and count of evaluation.json's raw per-case values; its
    model hash is the weights file's, its datalist hash the datalist's."""
    from monai.bundle import ConfigParser

    from dmaf_components.data import build_datalist, write_datalist

    data = tmp_path / "brats"
    shutil.copytree(tiny_brats, data)
    datalist = build_datalist(str(data), "brats", split=(3, 1, 2), seed=0)
    del datalist["testing"][1]["image"]["t2"]  # combination t2 has one case: sd null
    write_datalist(datalist, str(data / "datalist.json"))
    root = tmp_path / "root"
    (root / "models").mkdir(parents=True)
    torch.save({"w": torch.arange(3.0)}, root / "models" / "model.pt")  # the weights the table is bound to
    parser = ConfigParser()
    parser.read_config(EVALUATION)
    parser.update(
        {
            "roi_size": [32, 32, 32],
            "channels": [4, 8, 16, 32],
            "num_layers": 1,
            "num_workers": 0,
            "device": "$torch.device('cpu')",
            "dataset_dir": str(data),
            "bundle_root": str(root),
            "network": _ThresholdNet(),
        }
    )
    parser.get_parsed_content("evaluator").run()
    assert sorted(os.listdir(root / "models")) == ["model.pt", "quality.json"]  # no temporary file left
    table = json.load(open(root / "models" / "quality.json"))
    evaluation = json.load(open(root / "eval" / "evaluation.json"))
    assert table["format_version"] == 1 and table["dataset"] == "brats" and table["variant"] == "raw"
    assert table["cases"] == evaluation["cases"] == 2
    assert table["model"]["sha256"] == _sha256(root / "models" / "model.pt")
    # the weights' own hash (names, dtypes, shapes, values), which a TorchScript export of them shares
    by_hand = hashlib.sha256(b"w|torch.float32|(3,)|" + np.arange(3, dtype=np.float32).tobytes()).hexdigest()
    assert table["model"]["weights_sha256"] == by_hand
    assert table["datalist"] == {"path": str(data / "datalist.json"), "sha256": _sha256(data / "datalist.json")}
    assert table["modalities"] == MODALITIES and table["regions"] == REGIONS
    assert list(table["combinations"]) == list(evaluation["per_case"]["raw"])  # all 15
    for name, values in evaluation["per_case"]["raw"].items():
        for r, region in enumerate(REGIONS):
            for metric in ("dice", "hd95"):
                v = np.asarray(values[metric], dtype=np.float64)[:, r]
                v = v[np.isfinite(v)]
                got = table["combinations"][name][region][metric]
                assert got["n"] == v.size and got["mean"] == pytest.approx(v.mean())
                assert got["sd"] == (pytest.approx(v.std(ddof=1)) if v.size > 1 else None)
    assert table["combinations"]["t2"]["ET"]["dice"]["n"] == 1
    assert table["combinations"]["flair"]["WT"]["dice"]["n"] == 2
    sds = [table["combinations"][n]["WT"]["dice"]["sd"] for n in table["combinations"] if n != "t2"]
    assert any(sd > 0 for sd in sds)  # the two cases differ: a real spread, not a constant


def _table(model_path) -> dict:
    """A hand-made quality table for the weights at ``model_path``."""
    combos = {}
    for pattern in modality_combinations(4):
        name = combination_name(pattern, MODALITIES)
        present = [m for m, p in zip(MODALITIES, pattern) if p]
        combos[name] = {
            region: {
                "dice": {"mean": 10.0 + sum(CONTRIBUTION[m][r] for m in present), "sd": 4.0 + r, "n": 7},
                "hd95": {"mean": 20.0 - r, "sd": 3.0, "n": 7},
            }
            for r, region in enumerate(REGIONS)
        }
    return {
        "format_version": 1,
        "dataset": "brats",
        "datalist": {"path": "datalist.json", "sha256": "0" * 64},
        "model": {"path": str(model_path), "sha256": _sha256(model_path)},
        "variant": "raw",
        "cases": 7,
        "modalities": MODALITIES,
        "regions": REGIONS,
        "combinations": combos,
    }


@pytest.fixture
def studies(tmp_path):
    """Study ``pair`` with FLAIR + T1ce, study ``single`` with FLAIR only, and tiny random weights."""
    from dmaf_components.networks import DMAFNet

    images, _ = brats_case(SHAPE, seed=5)
    for case, present in (("pair", ("flair", "t1ce")), ("single", ("flair",))):
        folder = tmp_path / "in" / case
        folder.mkdir(parents=True)
        for m in present:
            nib.save(nib.Nifti1Image(images[m].astype(np.float32), BRATS_AFFINE), str(folder / f"{case}_{m}.nii.gz"))
    torch.manual_seed(0)
    torch.save(DMAFNet(3, 4, 4, **NET).state_dict(), tmp_path / "model.pt")
    return tmp_path


def _infer(root, **override):
    from monai.bundle import ConfigWorkflow

    settings = {
        "dataset_dir": str(root / "in"),
        "output_dir": str(root / "out"),
        "checkpoint": str(root / "model.pt"),
        **override,
    }
    wf = ConfigWorkflow(
        config_file=INFERENCE,
        workflow_type="infer",
        logging_file=False,
        bundle_root=BUNDLE,
        roi_size=[32, 32, 32],
        channels=list(NET["channels"]),
        num_layers=1,
        num_heads=2,
        num_workers=0,
        **settings,
    )
    wf.initialize()
    return wf.run()


def _expected_advice(table, used):
    present = combination_name([m in used for m in MODALITIES], MODALITIES)
    advice = []
    for m in MODALITIES:
        if m in used:
            continue
        name = combination_name([x in used or x == m for x in MODALITIES], MODALITIES)
        gain = {
            r: table["combinations"][name][r]["dice"]["mean"] - table["combinations"][present][r]["dice"]["mean"]
            for r in REGIONS
        }
        advice.append((m, gain, float(np.mean(list(gain.values())))))
    return sorted(advice, key=lambda a: -a[2])


def test_reports_give_the_tables_expectation_and_advice(studies, caplog):
    """(b) FLAIR + T1ce: expected Dice is the table's flair+t1ce row, advice lists t2 then t1 with the table's
    differences; (e) a FLAIR-only study gets its report too. On by default when the table matches."""
    table = _table(studies / "model.pt")
    json.dump(table, open(studies / "quality.json", "w"))  # beside the weights: the default --quality_table
    with caplog.at_level(logging.INFO):
        _infer(studies)
    out = studies / "out"
    assert sorted(os.listdir(out)) == ["pair_report.json", "pair_seg.nii.gz", "single_report.json", "single_seg.nii.gz"]
    for case, used in (("pair", ["flair", "t1ce"]), ("single", ["flair"])):
        report = json.load(open(out / f"{case}_report.json"))
        assert report["case"] == case and report["segmentation"] == f"{case}_seg.nii.gz"
        assert report["modalities_found"] == report["modalities_used"] == used and report["not_used"] == {}
        assert report["quality_table"] == str(studies / "quality.json") and report["uncertainty"] is None
        row = table["combinations"]["+".join(used)]
        assert report["expected"]["combination"] == "+".join(used) and report["expected"]["variant"] == "raw"
        assert report["expected"]["regions"] == {
            r: {
                "dice_mean": row[r]["dice"]["mean"],
                "dice_sd": row[r]["dice"]["sd"],
                "cases": 7,
                "hd95_mean": row[r]["hd95"]["mean"],
                "hd95_sd": row[r]["hd95"]["sd"],
            }
            for r in REGIONS
        }
        expected = _expected_advice(table, used)
        assert [a["modality"] for a in report["advice"]] == [m for m, _, _ in expected]
        for a, (m, gain, mean) in zip(report["advice"], expected):
            assert a["dice_gain"] == pytest.approx(gain) and a["mean_gain"] == pytest.approx(mean)
        low = [r for r in REGIONS if row[r]["dice"]["mean"] < 50]
        assert report["flags"] == [
            f"expected {r} Dice below 50 with these sequences ({row[r]['dice']['mean']:.1f})" for r in low
        ]
    pair = json.load(open(out / "pair_report.json"))
    assert [a["modality"] for a in pair["advice"]] == ["t2", "t1"]  # t2 adds 12.3 on average, t1 5.3
    assert [f.split(" Dice")[0] for f in pair["flags"]] == ["expected ET"]  # ET 45, WT and TC 60
    single = json.load(open(out / "single_report.json"))
    assert [a["modality"] for a in single["advice"]] == ["t1ce", "t2", "t1"]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("study pair report")]
    assert lines == [
        f"study pair report: expected Dice WT 60.0, TC 60.0, ET 45.0 (flair+t1ce, 7 cases); acquiring t2 "
        f"would change mean Dice by +12.3; 1 flag(s): expected ET Dice below 50 with these sequences "
        f"(45.0) -> {out / 'pair_report.json'}"
    ]
    # planned like the label maps: kept unless --overwrite; --save_report False writes none
    with pytest.raises(SystemExit, match=r"4 result\(s\) exist already"):
        _infer(studies)
    shutil.rmtree(out)
    _infer(studies, save_report=False)
    assert sorted(os.listdir(out)) == ["pair_seg.nii.gz", "single_seg.nii.gz"]


def test_each_report_is_computed_once_from_one_reading_of_the_table(studies, monkeypatch):
    """The file and the sample's ``result`` (MONAI Label's answer) are one report: one study_report call per study,
    and the table read once, before any study."""
    import dmaf_components.inference as inference
    import dmaf_components.quality as quality

    json.dump(_table(studies / "model.pt"), open(studies / "quality.json", "w"))
    calls = {"report": 0, "table": 0}
    report, table = quality.study_report, quality.load_quality_table

    def counted_report(*a, **k):
        calls["report"] += 1
        return report(*a, **k)

    def counted_table(*a, **k):
        calls["table"] += 1
        return table(*a, **k)

    monkeypatch.setattr(quality, "study_report", counted_report)
    monkeypatch.setattr(quality, "load_quality_table", counted_table)
    monkeypatch.setattr(inference, "load_quality_table", counted_table, raising=False)
    _infer(studies)
    assert calls == {"report": 2, "table": 1}  # two studies
    written = json.load(open(studies / "out" / "pair_report.json"))
    assert written["segmentation"] == "pair_seg.nii.gz" and written["case"] == "pair"


def test_a_table_of_another_model_stops_the_run_before_any_study(studies):
    """(c) one line naming the table and both hashes; nothing written."""
    table = _table(studies / "model.pt")
    table["model"]["sha256"] = "ab" * 32
    json.dump(table, open(studies / "quality.json", "w"))
    with pytest.raises(SystemExit) as exc:
        _infer(studies)
    message = str(exc.value)
    assert "\n" not in message and message == (
        f"{studies / 'quality.json'}: quality table of another model (sha256 abababababab, {studies / 'model.pt'} has "
        f"{_sha256(studies / 'model.pt')[:12]}); re-run evaluate.json for these weights, or pass --save_report false"
    )
    assert not (studies / "out").exists()
    with pytest.raises(SystemExit, match="quality table of another model"):  # also with --save_report True
        _infer(studies, save_report=True)
    _infer(studies, save_report="false")  # no report wanted: the table is not read
    assert sorted(os.listdir(studies / "out")) == ["pair_seg.nii.gz", "single_seg.nii.gz"]


def test_model_ts_alone_runs_inference_with_its_table(studies):
    """A bundle that ships only models/model.ts runs with --checkpoint models/model.ts: the export's weights go into
    the eager network (the same labels as from model.pt), and the table of the evaluated model.pt matches it by the
    weights' own hash; a table of other weights is still refused."""
    from monai.networks.utils import convert_to_torchscript

    from dmaf_components.checkpoints import read_state_dict, weights_sha256
    from dmaf_components.networks import DMAFNet

    _infer(studies, output_dir=str(studies / "from_pt"), save_report=False)
    net = DMAFNet(3, 4, 4, **NET)
    net.load_state_dict(torch.load(studies / "model.pt"))
    shipped = studies / "shipped"
    shipped.mkdir()
    convert_to_torchscript(net.eval(), str(shipped / "model.ts"))
    table = _table(studies / "model.pt")  # evaluated as model.pt: the file hashes differ
    table["model"]["weights_sha256"] = weights_sha256(read_state_dict(str(studies / "model.pt")))
    json.dump(table, open(shipped / "quality.json", "w"))
    _infer(studies, checkpoint=str(shipped / "model.ts"))
    out = studies / "out"
    assert sorted(os.listdir(out)) == ["pair_report.json", "pair_seg.nii.gz", "single_report.json", "single_seg.nii.gz"]
    for case in ("pair", "single"):
        ts_seg = nib.load(str(out / f"{case}_seg.nii.gz")).get_fdata()
        assert np.array_equal(ts_seg, nib.load(str(studies / "from_pt" / f"{case}_seg.nii.gz")).get_fdata())
    report = json.load(open(out / "pair_report.json"))
    assert report["expected"]["regions"]["WT"]["dice_mean"] == table["combinations"]["flair+t1ce"]["WT"]["dice"]["mean"]
    table["model"]["weights_sha256"] = "cd" * 32
    json.dump(table, open(shipped / "quality.json", "w"))
    with pytest.raises(SystemExit, match="quality table of another model"):
        _infer(studies, checkpoint=str(shipped / "model.ts"), output_dir=str(studies / "out2"))


def test_no_table_is_a_note_and_expected_null(studies, caplog):
    """(d) without a table: one note; by default no report, with --save_report True a report saying expected null."""
    with caplog.at_level(logging.INFO):
        _infer(studies)
    notes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("note:")]
    assert notes == [
        f"note: {studies / 'quality.json'}: no quality table; reports say expected null (evaluate.json "
        "writes the table)"
    ]
    assert sorted(os.listdir(studies / "out")) == ["pair_seg.nii.gz", "single_seg.nii.gz"]
    _infer(studies, save_report=True, overwrite=True)
    for case, used in (("pair", ["flair", "t1ce"]), ("single", ["flair"])):
        report = json.load(open(studies / "out" / f"{case}_report.json"))
        assert report["modalities_found"] == report["modalities_used"] == used
        assert report["expected"] is None and report["advice"] is None and report["flags"] == []
        assert report["quality_table"] is None and report["uncertainty"] is None


def test_report_records_dropped_modalities_and_the_table_format_is_checked(studies):
    """An all-zero file (or 4-D channel) is found but not used (the report says why, and advises acquiring it); a
    quality.json of another format is refused in one line."""
    zeros = nib.Nifti1Image(np.zeros(SHAPE, np.float32), BRATS_AFFINE)
    nib.save(zeros, str(studies / "in" / "pair" / "pair_t2.nii.gz"))
    images, _ = brats_case(SHAPE, seed=5)
    four = np.stack([images[m] for m in MODALITIES], -1).astype(np.float32)
    four[..., 1] = 0  # t1 all zero
    nib.save(nib.Nifti1Image(four, BRATS_AFFINE), str(studies / "in" / "four.nii.gz"))
    table = _table(studies / "model.pt")
    json.dump(table, open(studies / "quality.json", "w"))
    _infer(studies)
    report = json.load(open(studies / "out" / "pair_report.json"))
    assert report["modalities_found"] == ["flair", "t1ce", "t2"] and report["modalities_used"] == ["flair", "t1ce"]
    assert report["not_used"] == {"t2": "all zero"} and report["advice"][0]["modality"] == "t2"
    report = json.load(open(studies / "out" / "four_report.json"))
    assert report["modalities_found"] == MODALITIES and report["modalities_used"] == ["flair", "t1ce", "t2"]
    assert report["not_used"] == {"t1": "all zero"} and report["expected"]["combination"] == "flair+t1ce+t2"
    assert [a["modality"] for a in report["advice"]] == ["t1"]
    assert report["flags"] == ["expected ET Dice below 50 with these sequences (47.0)"]  # 10 + 5 + 30 + 2
    for broken, cause in (
        ({**table, "format_version": 99}, "format_version 99"),
        ({"cases": 3}, "not a quality table"),
        ({**table, "modalities": ["flair", "t1"]}, "quality table for modalities"),
    ):
        json.dump(broken, open(studies / "quality.json", "w"))
        with pytest.raises(SystemExit, match=cause):
            _infer(studies, overwrite=True)
    open(studies / "quality.json", "w").write("{not json")
    with pytest.raises(SystemExit, match=r"quality.json: quality table cannot be read \(Expecting"):
        _infer(studies, overwrite=True)


def test_a_never_trained_modality_is_found_not_used_and_never_advised(studies):
    """A training checkpoint whose DTM state records no T2: the report of a FLAIR + T2 study says T2 was not used
    and why, its expectation is FLAIR's, and T2 is not advised (acquiring it would not be used)."""
    state = torch.load(studies / "model.pt", weights_only=True)
    dtm = {
        "ema_relation": torch.zeros(4, dtype=torch.float64),
        "ema_prototype": torch.zeros(4, dtype=torch.float64),
        "seen": torch.tensor([True, True, True, False]),
        "prev_grads": [None] * 4,
    }
    torch.save({"model": state, "dtm": dtm, "trainer": {"iteration": 4}}, studies / "no_t2.pt")
    json.dump(_table(studies / "no_t2.pt"), open(studies / "quality.json", "w"))
    images, _ = brats_case(SHAPE, seed=5)
    folder = studies / "in2" / "mixed"
    folder.mkdir(parents=True)
    for m in ("flair", "t2"):
        nib.save(nib.Nifti1Image(images[m].astype(np.float32), BRATS_AFFINE), str(folder / f"mixed_{m}.nii.gz"))
    _infer(studies, dataset_dir=str(studies / "in2"), checkpoint=str(studies / "no_t2.pt"))
    report = json.load(open(studies / "out" / "mixed_report.json"))
    assert report["modalities_found"] == ["flair", "t2"] and report["modalities_used"] == ["flair"]
    assert report["not_used"] == {"t2": "never seen in training"} and report["expected"]["combination"] == "flair"
    assert [a["modality"] for a in report["advice"]] == ["t1ce", "t1"]  # mean gains 26.7 and 5.3; t2 not advised


def test_study_reportd_puts_the_report_where_monai_label_answers_with_it(tmp_path):
    """The postprocessing step (MONAI Label's infer response carries ``data["result"]``): a 4-D study whose T1 is
    all zero reports T1 found but not used, the table's flair+t1ce+t2 row and T1's gain, and the uncertainty's
    summary when it ran; ``auto`` without a table adds nothing; a table of another model is one line."""
    from monai.data import MetaTensor

    from dmaf_components.data.constants import DMAFDataError
    from dmaf_components.quality import StudyReportd
    from dmaf_components.uncertainty import UNCERTAINTY_SUMMARY_KEY

    torch.save({"w": torch.ones(1)}, tmp_path / "model.pt")
    table = _table(tmp_path / "model.pt")
    json.dump(table, open(tmp_path / "quality.json", "w"))
    pred = MetaTensor(torch.zeros(1, 4, 4, 4), meta={"filename_or_obj": "/data/study_07.nii.gz"})
    sample = {
        "pred": pred,
        "modality_mask": torch.tensor([True, False, True, True]),
        "image_available": torch.tensor([True, False, True, True]),
        UNCERTAINTY_SUMMARY_KEY: {"measure": "m"},
    }
    step = StudyReportd(
        modalities=MODALITIES, quality_table=str(tmp_path / "quality.json"), checkpoint=str(tmp_path / "model.pt")
    )
    report = step(sample)["result"]
    assert report["case"] == "study_07" and report["modalities_found"] == MODALITIES
    assert report["modalities_used"] == ["flair", "t1ce", "t2"] and report["not_used"] == {"t1": "all zero"}
    row = table["combinations"]["flair+t1ce+t2"]
    assert {r: v["dice_mean"] for r, v in report["expected"]["regions"].items()} == {
        r: row[r]["dice"]["mean"] for r in REGIONS
    }
    assert [(a["modality"], a["dice_gain"]) for a in report["advice"]] == [
        (
            "t1",
            {r: table["combinations"]["flair+t1+t1ce+t2"][r]["dice"]["mean"] - row[r]["dice"]["mean"] for r in REGIONS},
        )
    ]
    assert report["uncertainty"] == {"measure": "m"}
    # the writer's other keys in "result" are kept
    assert step({**sample, "result": {"other": 1}})["result"]["other"] == 1
    # auto without a table and without the uncertainty: no report
    bare = StudyReportd(
        modalities=MODALITIES, quality_table=str(tmp_path / "absent.json"), checkpoint=str(tmp_path / "model.pt")
    )
    assert "result" not in bare({k: v for k, v in sample.items() if k != UNCERTAINTY_SUMMARY_KEY})
    torch.save({"w": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(DMAFDataError, match="quality table of another model"):
        StudyReportd(
            modalities=MODALITIES, quality_table=str(tmp_path / "quality.json"), checkpoint=str(tmp_path / "other.pt")
        )(sample)
