"""`dmaf ablation`: the Table-3 runner resumes, skips finished runs, writes the paper's table, and its paired
intervals are right on hand-made examples (the intervals themselves: tests/test_stats.py)."""

from __future__ import annotations

import csv
import json
import os
import shutil

import numpy as np
import pytest

from dmaf_components.ablation import (
    AblationRunError,
    AblationStudy,
    paired_bootstrap,
    resolve_settings,
    setting_overrides,
    summarize_records,
)


def test_bootstrap_interval_on_hand_made_examples():
    # a constant difference has a zero-width interval at that value
    assert paired_bootstrap(np.full((3, 4), 2.0)) == (2.0, 2.0, 2.0)
    # two seeds, one case, differences 0 and 2: a replicate's mean is 0, 1 or 2 with probability 1/4, 1/2, 1/4, so
    # the 2.5 % and 97.5 % quantiles are 0 and 2
    mean, low, high = paired_bootstrap(np.array([[0.0], [2.0]]), n_boot=4000)
    assert (mean, low, high) == (1.0, 0.0, 2.0)
    # cases are resampled too: one seed, 100 cases of N(1, 1): the interval is about mean +- 1.96 / 10
    d = np.random.default_rng(0).normal(1.0, 1.0, size=(1, 100))
    mean, low, high = paired_bootstrap(d)
    assert low < mean < high and abs((high - low) - 2 * 1.96 * d.std() / 10) < 0.06


def _record(setting, seed, dice, hd):
    """A run record with per-case values: dice/hd (combinations, cases, regions)."""
    combos = ["a", "b", "a+b"]
    return {
        "setting": setting,
        "seed": seed,
        "evaluation": {
            "regions": ["R1", "R2"],
            "per_case": {
                "raw": {
                    c: {"dice": np.asarray(dice[i]).tolist(), "hd95": np.asarray(hd[i]).tolist()}
                    for i, c in enumerate(combos)
                }
            },
        },
    }


def test_summary_means_stds_and_paired_differences_by_hand(tmp_path):
    from dmaf_components.ablation import write_summary

    ones = np.ones((3, 2, 2))
    records = [
        _record("baseline", 0, 60 * ones, 10 * ones),
        _record("baseline", 1, 62 * ones, 12 * ones),
        _record("full", 0, 65 * ones, 8 * ones),
        _record("full", 1, 69 * ones, 8 * ones),
    ]
    summary = summarize_records(records)
    rows = {r["setting"]: r for r in summary["rows"]}
    assert [r["setting"] for r in summary["rows"]] == ["baseline", "full"]
    assert rows["baseline"]["DSC_avg"] == 61.0 and rows["full"]["DSC_R1"] == 67.0
    assert rows["full"]["DSC_avg_std"] == pytest.approx(np.std([65, 69], ddof=1))
    assert rows["full"]["DSC_avg_diff"] == pytest.approx(6.0)  # (5 + 7) / 2, paired by seed
    # two seeds, differences 5 and 7 on every case: the interval is over seeds, 6 +- t(0.975, 1 df) * 1, never the
    # [5, 7] a case bootstrap gives (which stays as the labelled second column)
    assert rows["full"]["DSC_avg_diff_low"] == pytest.approx(6.0 - 12.7062, abs=1e-3)
    assert rows["full"]["DSC_avg_diff_high"] == pytest.approx(6.0 + 12.7062, abs=1e-3)
    assert (rows["full"]["DSC_avg_diff_boot_low"], rows["full"]["DSC_avg_diff_boot_high"]) == (5.0, 7.0)
    assert rows["full"]["DSC_avg_diff_p"] == 0.5  # 2 seeds: 4 sign patterns, 2 as extreme as the observed one
    assert rows["full"]["HD95_avg_diff"] == pytest.approx(-3.0)
    write_summary(summary, str(tmp_path))
    table = open(tmp_path / "table3.md").read()
    assert "| DMAF | Distillation | DTM | DSC R1 | DSC R2 | DSC Avg. | HD95 R1 | HD95 R2 | HD95 Avg." in table
    assert "| • | • | • | 67.00 ± 2.83 |" in table and "+6.00 [-6.71, +18.71]" in table
    assert "| full | +6.00 [-6.71, +18.71] | 0.5 |" in table and "| [+5.00, +7.00] |" in table
    # per combination and region: the paired difference to the baseline with its interval
    with open(tmp_path / "combinations.csv") as f:
        combo = {(r["setting"], r["combination"]): r for r in csv.DictReader(f)}
    assert float(combo[("full", "a+b")]["DSC_R2"]) == 67.0 and float(combo[("full", "a+b")]["DSC_R2_diff"]) == 6.0
    low, high = float(combo[("full", "a")]["DSC_R1_diff_low"]), float(combo[("full", "a")]["DSC_R1_diff_high"])
    assert (low, high) == pytest.approx((6.0 - 12.7062, 6.0 + 12.7062), abs=1e-3)
    assert combo[("baseline", "a")]["DSC_R1_diff"] == ""
    assert os.path.getsize(tmp_path / "table3.png") > 0


def test_time_left_counts_only_the_epochs_this_process_trained():
    """A run resumed after epoch 9 that finished epochs 10-12 in 60 s has 8 epochs left at 20 s each: 160 s. (Counting
    all 12 epochs against this process's time said 40 s: the estimate of every resumed run was too short.)"""
    from dmaf_components.ablation.runner import _time_left

    assert _time_left(60.0, first_epoch=10, epoch=12, max_epochs=20) == pytest.approx(160.0)
    assert _time_left(60.0, first_epoch=1, epoch=3, max_epochs=20) == pytest.approx(340.0)  # a fresh run
    assert _time_left(5.0, first_epoch=20, epoch=20, max_epochs=20) == 0.0


def test_settings_names():
    assert resolve_settings("table3")[0] == "baseline" and len(resolve_settings("table3")) == 8
    assert resolve_settings("full") == ["baseline", "full"]  # the baseline is always there to compare against
    with pytest.raises(ValueError, match="unknown setting 'fusion'"):
        resolve_settings("baseline,fusion")


@pytest.mark.slow
def test_study_through_the_bundle_resumes_and_skips_finished_runs(tiny_myops, tmp_path):
    from dmaf_components.data import build_datalist, write_datalist

    data = tmp_path / "myops"
    shutil.copytree(tiny_myops, data)
    write_datalist(build_datalist(str(data), "myops", split=(3, 1, 1), seed=0), str(data / "datalist.json"))
    lines = []
    small = {
        "roi_size": [48, 48],
        "crop_size": [56, 56, -1],
        "channels": [8, 16, 32],
        "num_layers": 1,
        "num_workers": 0,
        "epochs": 2,
        "val_interval": 1,
    }
    study = AblationStudy("myops", str(data), str(tmp_path / "study"), "full", 1, overrides=small, log=lines.append)
    study.run()
    rows = list(csv.DictReader(open(tmp_path / "study" / "table3.csv")))
    assert [r["setting"] for r in rows] == ["baseline", "full"]
    record = json.load(open(study.record_path("full", 0)))
    assert record["overrides"]["fusion"] == "dmaf" and record["overrides"]["distillation"] is True
    assert record["datalist_sha256"] and record["versions"]["dmaf_components"]
    assert len(record["evaluation"]["per_case"]["raw"]) == 7  # every combination of 3 modalities
    assert any("epoch 2/2" in line for line in lines)
    # the learning curve is in the record: validated after epochs 1 and 2, 3 training cases of batch 1 per epoch
    curve = record["validation"]
    assert curve["epoch"] == [1, 2] and curve["iteration"] == [3, 6]
    assert all(0.0 <= v <= 1.0 for v in curve["val_mean_dice"])

    # a finished study does nothing again
    mtime = os.path.getmtime(study.record_path("baseline", 0))
    lines.clear()
    study.run()
    assert "2 already recorded, 0 to do" in lines[0] and os.path.getmtime(study.record_path("baseline", 0)) == mtime

    # a run killed after its epoch-1 checkpoint continues from it (not from scratch) and is recorded
    run_dir = study.run_dir("full", 0)
    first = record["train_seconds"]
    assert not record["train_resumed"] and first > 0
    os.remove(study.record_path("full", 0))
    os.remove(os.path.join(run_dir, "training.done"))
    assert study.latest_checkpoint(run_dir) is not None
    lines.clear()
    study.run()
    assert any("continuing from checkpoint_" in line for line in lines) and os.path.exists(study.record_path("full", 0))
    # its training time is the first process's plus the second's, not the second's alone
    resumed = json.load(open(study.record_path("full", 0)))
    assert resumed["train_resumed"] and resumed["train_seconds"] > first


@pytest.mark.slow
def test_jobs_run_concurrently_and_a_failed_run_does_not_stop_the_others(tiny_myops, tmp_path, monkeypatch):
    """--jobs N: at most N runs at a time, every run is done once, a failure is reported after the rest ran."""
    import threading
    import time

    from dmaf_components.data import build_datalist, write_datalist

    write_datalist(build_datalist(str(tiny_myops), "myops", split=(3, 1, 1), seed=0), str(tmp_path / "dl.json"))
    study = AblationStudy(
        "myops",
        str(tiny_myops),
        str(tmp_path / "study"),
        "dmaf,full",
        [0, 1],
        datalist=str(tmp_path / "dl.json"),
        log=lambda line: None,
        jobs=2,
    )
    running, peak, done, lock, envs = [0], [0], [], threading.Lock(), []
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)

    def fake_run_one(setting, seed, label="", env=None):
        envs.append(env)
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.2)
        with lock:
            running[0] -= 1
            done.append((setting, seed))
        if (setting, seed) == ("dmaf", 0):
            raise RuntimeError("bundle command failed (exit 1): ValueError: x — full log: L")
        return {}

    monkeypatch.setattr(study, "run_one", fake_run_one)
    monkeypatch.setattr(study, "summarize", lambda summarizing=True: {})
    with pytest.raises(
        AblationRunError,
        match=r"^ablation: 1 of 6 runs failed; first: \[\d/6\] dmaf seed 0: bundle "
        r"command failed \(exit 1\): ValueError: x — full log: L$",
    ):
        study.run()
    assert sorted(done) == sorted(study.runs()) and peak[0] == 2
    cpus = len(os.sched_getaffinity(0))
    assert all(e["OMP_NUM_THREADS"] == str(max(1, cpus // 2)) for e in envs)  # the CPUs shared out between the jobs
    with pytest.raises(ValueError, match="--jobs: need at least 1"):
        AblationStudy(
            "myops", str(tiny_myops), str(tmp_path / "s2"), "full", 1, datalist=str(tmp_path / "dl.json"), jobs=0
        )


def test_a_variant_study_is_paired_with_its_reference_study(tiny_myops, tmp_path):
    """--reference: a variant's runs are compared with the reference study's same setting and seeds (not with a
    baseline, which is then not run), and a reference made on another datalist is refused, naming its record."""
    from dmaf_components.ablation import write_summary
    from dmaf_components.ablation.records import file_sha256
    from dmaf_components.data import build_datalist, write_datalist

    dl = tmp_path / "dl.json"
    write_datalist(build_datalist(str(tiny_myops), "myops", split=(3, 1, 1), seed=0), str(dl))
    ones = np.ones((3, 2, 2))
    ref_dir, var_dir = tmp_path / "ref", tmp_path / "variant"
    for folder, value in ((ref_dir, {0: 60, 1: 70}), (var_dir, {0: 63, 1: 71})):
        for seed, dice in value.items():
            rec = dict(_record("full", seed, dice * ones, 10 * ones), datalist_sha256=file_sha256(str(dl)))
            os.makedirs(folder / "runs" / "full" / f"seed{seed}")
            with open(folder / "runs" / "full" / f"seed{seed}" / "record.json", "w") as f:
                json.dump(rec, f)
    study = AblationStudy(
        "myops",
        str(tiny_myops),
        str(var_dir),
        "full",
        2,
        datalist=str(dl),
        reference=str(ref_dir),
        log=lambda line: None,
    )
    assert study.runs() == [("full", 0), ("full", 1)]  # no baseline to run
    summary = study.summarize()
    row = summary["rows"][0]
    assert row["DSC_avg_diff"] == pytest.approx(2.0) and row["DSC_avg_diff_seed0"] == pytest.approx(3.0)
    # seeds differ by 3 and 1: 2 +- t(0.975, 1 df) * 1 over seeds; the case bootstrap's [1, 3] is the second column
    assert (row["DSC_avg_diff_low"], row["DSC_avg_diff_high"]) == pytest.approx((2 - 12.7062, 2 + 12.7062), abs=1e-3)
    assert (row["DSC_avg_diff_boot_low"], row["DSC_avg_diff_boot_high"]) == (pytest.approx(1.0), pytest.approx(3.0))
    table = open(var_dir / "table3.md").read()
    assert "vs reference" in table and "the same setting of the reference ../ref" in table
    # a variant's overrides are named in the note; a seed without counterpart is left out of Δ, and said so
    variant_overrides = {**setting_overrides("full"), "learn_alpha1": False}
    for seed in (0, 1):
        rec = json.load(open(var_dir / "runs" / "full" / f"seed{seed}" / "record.json"))
        json.dump(
            dict(rec, overrides=variant_overrides), open(var_dir / "runs" / "full" / f"seed{seed}" / "record.json", "w")
        )
    os.makedirs(var_dir / "runs" / "full" / "seed2")
    json.dump(
        dict(
            _record("full", 2, 90 * ones, 10 * ones), datalist_sha256=file_sha256(str(dl)), overrides=variant_overrides
        ),
        open(var_dir / "runs" / "full" / "seed2" / "record.json", "w"),
    )
    lines = []
    three = AblationStudy(
        "myops",
        str(tiny_myops),
        str(var_dir),
        "full",
        3,
        datalist=str(dl),
        overrides={"learn_alpha1": False},
        reference=str(ref_dir),
        log=lines.append,
    )
    row = three.summarize()["rows"][0]
    assert row["seeds"] == 3 and row["paired_seeds"] == 2 and row["DSC_avg_diff"] == pytest.approx(2.0)
    table = open(var_dir / "table3.md").read()
    assert "(2 of 3 seeds paired)" in table and "Without a counterpart (left out of Δ): full seed 2" in table
    assert "learn_alpha1 = False (reference: default)" in table
    assert any("no counterpart" in line and "full seed 2" in line for line in lines)
    # the reference must be on the same data
    rec_path = ref_dir / "runs" / "full" / "seed1" / "record.json"
    rec = json.load(open(rec_path))
    json.dump(dict(rec, datalist_sha256="0" * 64), open(rec_path, "w"))
    with pytest.raises(ValueError, match=f"{rec_path}: datalist_sha256 differs"):
        three.summarize()
    with pytest.raises(ValueError, match=f"{rec_path}: datalist_sha256 differs"):  # refused before anything trains
        AblationStudy(
            "myops", str(tiny_myops), str(tmp_path / "v4"), "full", 2, datalist=str(dl), reference=str(ref_dir)
        )
    with pytest.raises(ValueError, match="not a study folder"):
        AblationStudy("myops", str(tiny_myops), str(var_dir), "full", 2, datalist=str(dl), reference=str(tmp_path))
    write_summary(summary, str(tmp_path / "again"))  # the summary is self-contained
    # a variant may change what a setting sets (the full model without Eq. 18), only against a reference
    variant = AblationStudy(
        "myops",
        str(tiny_myops),
        str(tmp_path / "v2"),
        "full",
        1,
        datalist=str(dl),
        overrides={"dtm_scaling": "none"},
        reference=str(ref_dir),
    )
    assert variant.train_command("full", 0)[-2:] == ["--dtm_scaling", "none"]
    with pytest.raises(ValueError, match=r"overrides \['dtm_scaling'\]: set by the study itself"):
        AblationStudy(
            "myops",
            str(tiny_myops),
            str(tmp_path / "v3"),
            "full",
            1,
            datalist=str(dl),
            overrides={"dtm_scaling": "none"},
        )


def test_component_effects_in_the_factorial_design_by_hand(tmp_path):
    """With all eight settings, each component's main effect (averaged over the other two) and its effect in the full
    model. On hand-made data DSC = 60 + 3 DMAF - distillation + 2 (DMAF and distillation) + 4 (distillation and DTM)
    + a seed offset + a case offset (both cancel in the pairing):
    DMAF: 3 + 2 distillation -> 4 averaged, 5 in the full model; distillation: -1 + 2 DMAF + 4 DTM -> 2 and 5;
    DTM: 4 distillation -> 2 and 4."""
    from dmaf_components.ablation import SETTINGS, component_effects, write_summary

    case = np.arange(2)[None, :, None] * 7.0 + np.zeros((3, 2, 2))  # (combinations, cases, regions)
    records = []
    for name, (dmaf, distill, dtm) in SETTINGS.items():
        for seed in (0, 1):
            dsc = 60 + 3 * dmaf - distill + 2 * (dmaf and distill) + 4 * (distill and dtm) + 5 * seed
            records.append(_record(name, seed, dsc + case, 10 + case))
    summary = summarize_records(records)
    effects = {e["component"]: e for e in summary["effects"]}
    for component, averaged, in_full in (("DMAF", 4.0, 5.0), ("distillation", 2.0, 5.0), ("DTM", 2.0, 4.0)):
        assert effects[component]["averaged"][:3] == pytest.approx((averaged,) * 3), component
        assert effects[component]["in_full"][:3] == pytest.approx((in_full,) * 3), component
    assert effects["DTM"]["seeds"] == 2
    write_summary(summary, str(tmp_path))
    table = open(tmp_path / "table3.md").read()
    assert "| distillation | +2.00 [+2.00, +2.00] (p 0.5) | +5.00 [+5.00, +5.00] (p 0.5) |" in table
    assert open(tmp_path / "effects.csv").read().splitlines()[1].startswith("DMAF,4.0,4.0,4.0,0.5,5.0,5.0,5.0,0.5,2")
    # without all eight settings there is no factorial design to read
    assert component_effects({"baseline": {0: records[0]}, "full": {0: records[-1]}}) == []


@pytest.mark.slow
def test_a_study_refuses_when_the_bundle_would_run_other_code(tiny_myops, tmp_path, monkeypatch):
    """Records name the runner's code, so the bundle's processes must import the same dmaf_components: a runner
    that imports another copy (here: the bundle's processes given a different package first on PYTHONPATH) is
    refused before any run, naming both places."""
    from dmaf_components.data import build_datalist, write_datalist

    write_datalist(build_datalist(str(tiny_myops), "myops", split=(3, 1, 1), seed=0), str(tmp_path / "dl.json"))
    study = AblationStudy(
        "myops",
        str(tiny_myops),
        str(tmp_path / "study"),
        "full",
        1,
        datalist=str(tmp_path / "dl.json"),
        log=lambda line: None,
    )
    study.check_bundle_package()  # the installed package: the same on both sides
    other = tmp_path / "other" / "dmaf_components"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("")
    monkeypatch.setenv("PYTHONPATH", str(other.parent))
    with pytest.raises(ValueError, match=f"import dmaf_components from {other}, this runner from"):
        study.run()
    assert not (tmp_path / "study" / "runs").exists()  # nothing started


@pytest.mark.slow
def test_a_study_refuses_runs_made_for_another_study_and_bad_input_in_one_line(
    tiny_myops, tmp_path, monkeypatch, capsys
):
    """A finished or started run is reused only when it was made with this study's dataset, datalist and overrides
    (reusing it otherwise puts another experiment's numbers in the table, silently); everything else a user can get
    wrong is refused in one line naming the flag or file, before any bundle process starts."""
    from dmaf_components import cli
    from dmaf_components.ablation.records import file_sha256
    from dmaf_components.ablation.runner import _cause
    from dmaf_components.data import build_datalist, write_datalist

    dl = tmp_path / "dl.json"
    write_datalist(build_datalist(str(tiny_myops), "myops", split=(3, 1, 1), seed=0), str(dl))
    out = tmp_path / "study"
    small = {"max_epochs": 2, "roi_size": [48, 48]}
    ones = np.ones((3, 2, 2))
    for setting in ("baseline", "full"):
        os.makedirs(out / "runs" / setting / "seed0")
        json.dump(
            dict(
                _record(setting, 0, 60 * ones, 10 * ones),
                dataset="myops",
                datalist_sha256=file_sha256(str(dl)),
                overrides={**setting_overrides(setting), **small},
            ),
            open(out / "runs" / setting / "seed0" / "record.json", "w"),
        )

    def study(**kw):
        args = {"datalist": str(dl), "overrides": small, "log": lambda line: None, **kw}
        return AblationStudy("myops", str(tiny_myops), str(out), "full", 1, **args)

    def no_bundle(*a, **k):
        raise AssertionError("a bundle process was started")

    assert study().summarize()["n_records"] == 2  # the same study: its records are used
    # records of older versions hold the old key name (max_epochs): the model zoo's name (epochs) matches them
    assert study(overrides={"epochs": 2, "roi_size": [48, 48]}).summarize()["n_records"] == 2
    # rebuilding the summary without naming the overrides: the records must agree with each other
    lines = []
    assert (
        AblationStudy("myops", str(tiny_myops), str(out), "full", 1, datalist=str(dl), log=lines.append).summarize()[
            "n_records"
        ]
        == 2
    )
    assert "ablation: the runs were made with --epochs 2 --roi_size [48, 48]" in lines
    with pytest.raises(ValueError, match=r"made with other overrides: --epochs 2 \(now 50\); name the overrides"):
        study(overrides={**small, "max_epochs": 50}).summarize()
    # another budget, another datalist or another dataset family: refused, naming the record and what differs
    record = out / "runs" / "baseline" / "seed0" / "record.json"
    with pytest.raises(ValueError, match=rf"{record}: made with other overrides: --epochs 2 \(now 50\)"):
        study(overrides={**small, "max_epochs": 50}).run()
    other = tmp_path / "other.json"
    write_datalist(build_datalist(str(tiny_myops), "myops", split=(2, 1, 2), seed=0), str(other))
    s = study(datalist=str(other))
    monkeypatch.setattr(s, "check_bundle_package", no_bundle)
    with pytest.raises(ValueError, match=rf"{record}: made with datalist_sha256 .*delete .*baseline/seed0 to redo"):
        s.run()
    # a started run (no record yet) is checked by its run.json; a run.json of the same study is resumed
    os.makedirs(out / "runs" / "full" / "seed1")
    started = out / "runs" / "full" / "seed1" / "run.json"
    json.dump(
        dict(study().identity("full", 1), overrides={**setting_overrides("full"), "max_epochs": 9}), open(started, "w")
    )
    with pytest.raises(
        ValueError,
        match=rf"{started}: made with other overrides: --epochs 9 \(now 2\), "
        r"--roi_size \(not set\) \(now \[48, 48\]\)",
    ):
        AblationStudy("myops", str(tiny_myops), str(out), "full", 2, datalist=str(dl), overrides=small).run()
    json.dump(study().identity("full", 1), open(started, "w"))
    two = AblationStudy(
        "myops", str(tiny_myops), str(out), "full", 2, datalist=str(dl), overrides=small, log=lambda line: None
    )
    two.check_existing_runs()
    # a torn record, or JSON that is not a record, is named
    record.write_text(json.dumps({"seed": 0}))
    with pytest.raises(ValueError, match=rf"{record}: not a run record \(no setting, evaluation\)"):
        study().run()
    record.write_text(record.read_text()[:4])
    with pytest.raises(ValueError, match=rf"{record}: cannot read the record"):
        study().summarize()
    shutil.rmtree(out / "runs")
    with pytest.raises(ValueError, match=r"study: no finished run of settings baseline,full and seeds 0 to summarize"):
        study().summarize()
    # bad flags and datalists, each in one line before anything runs
    bad = [
        ({"seeds": "abc"}, r"--seeds: need a count"),
        ({"seeds": 2.5}, r"--seeds: need a count"),
        ({"seeds": [0, 0]}, r"--seeds: seed given twice"),
        ({"overrides": {"max_epochs": "abc"}}, r"--epochs: expected a whole number .*got 'abc'"),
        ({"overrides": {"roi_size": 48}}, r"--roi_size: expected a list"),
        ({"overrides": {"max_epochs": 2.5}}, r"--epochs: expected a whole number"),
        ({"overrides": {"learn_alpha1": 1}}, r"--learn_alpha1: expected True or False"),
        ({"out": str(dl)}, r"--out .*dl.json: is a file"),
    ]
    for kw, message in bad:
        args = {"settings": "full", "seeds": 1, "datalist": str(dl), **kw}
        with pytest.raises(ValueError, match=message):
            AblationStudy("myops", str(tiny_myops), args.pop("out", str(out)), **args)
    for fine in ({"epochs": "$@val_interval * 2"}, {"roi_size": (48, 48)}, {"learning_rate": 1}):  # not refused
        AblationStudy("myops", str(tiny_myops), str(out), "full", 1, datalist=str(dl), overrides=fine)
    content = json.load(open(dl))
    for name, change, message in (
        ("torn.json", None, r"torn.json: cannot read the datalist"),
        ("notest.json", {"testing": []}, r"notest.json: no case in 'testing'"),
        ("brats.json", {"dataset": "brats"}, r"a brats datalist, but the study's dataset is myops"),
    ):
        path = tmp_path / name
        path.write_text(json.dumps(content)[:50] if change is None else json.dumps({**content, **change}))
        with pytest.raises(ValueError, match=message):
            AblationStudy("myops", str(tiny_myops), str(out), "full", 1, datalist=str(path))
    # a failed bundle command is reported by the line that says why, not the log's last line
    log = tmp_path / "bundle.log"
    log.write_text(
        "$ python -m monai.bundle run training\nTraceback\n  torch.OutOfMemoryError: an earlier process\n"
        "$ python -m monai.bundle run training --resume_from x\nTraceback\n"
        "  dmaf_components.data.constants.DMAFDataError: case_3: T2 missing\n\nThe above...\n"
        "RuntimeError: Failed to evaluate ConfigExpression\n  __local_refs['dataset_dir'])\n"
    )
    assert _cause(str(log)) == "dmaf_components.data.constants.DMAFDataError: case_3: T2 missing"
    log.write_text(log.read_text() + "$ python -m monai.bundle run evaluate\nKilled\n")  # the last process's cause
    assert _cause(str(log)) == "Killed"

    # failed runs end the command with one line and status 1
    def failing_run_one(self, setting, seed, label="", env=None):
        raise RuntimeError("bundle command failed (exit 1): KeyError: 'x' — full log: L")

    monkeypatch.setattr(AblationStudy, "run_one", failing_run_one)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(
            [
                "ablation",
                "myops",
                str(tiny_myops),
                "--out",
                str(out),
                "--settings",
                "full",
                "--seeds",
                "1",
                "--datalist",
                str(dl),
            ]
        )
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1 and err == [
        "dmaf: error: ablation: 2 of 2 runs failed; first: [1/2] baseline "
        "seed 0: bundle command failed (exit 1): KeyError: 'x' — full log: L"
    ]


def test_a_summary_leaves_no_stale_files_of_an_earlier_summary(tmp_path):
    """Summarising fewer settings after all eight must not leave the earlier effects.csv and table3.png behind as if
    they were this summary's."""
    from dmaf_components.ablation import SETTINGS, write_summary

    ones = np.ones((3, 2, 2))
    records = [
        _record(name, seed, (60 + i + seed) * ones, 10 * ones) for i, name in enumerate(SETTINGS) for seed in (0, 1)
    ]
    write_summary(summarize_records(records), str(tmp_path))
    assert (tmp_path / "effects.csv").exists() and (tmp_path / "table3.png").exists()
    write_summary(summarize_records([r for r in records if r["setting"] == "baseline"]), str(tmp_path))
    assert not (tmp_path / "effects.csv").exists() and not (tmp_path / "table3.png").exists()


def test_a_variants_changes_compare_old_and_new_key_names_as_one():
    """A reference study's records of older versions say max_epochs, a variant's say epochs: the same budget, so
    the summary lists only what the variant really changed."""
    from dmaf_components.ablation.report import _override_changes

    run = {"overrides": {"epochs": 80, "dtm_scaling": "none"}}
    reference = {"overrides": {"max_epochs": 80}}
    assert _override_changes([(run, reference)]) == {"dtm_scaling": "none (reference: default)"}


def test_a_reserved_key_is_refused_under_the_name_given(tiny_myops, tmp_path):
    """--datalist (the old name of data_list_file_path) is the study's own: refused as the user wrote it."""
    from dmaf_components.ablation import AblationStudy
    from dmaf_components.data import build_datalist, write_datalist

    dl = tmp_path / "dl.json"
    write_datalist(build_datalist(str(tiny_myops), "myops", split=(3, 1, 1), seed=0), str(dl))
    with pytest.raises(ValueError, match=r"overrides \['datalist'\]: set by the study itself"):
        AblationStudy(
            "myops", str(tiny_myops), str(tmp_path / "s"), "full", 1, datalist=str(dl), overrides={"datalist": "x"}
        )
