"""benchmarks/gpu_lease.sh, the one script of a GPU lease, in its CPU dry run (DRY_RUN=1: device cpu, no AMP, 32^3
steps, tiny data and network, one epoch, one seed, the baseline alone): every section leaves its files under OUT
with real content (the step's and the epochs' figures parse, each finished study run's record is in study.tgz), OUT
keeps to the device tool's 8 files, and a too-small LEASE_S skips the later sections with one line while keeping
what was done.

The study section runs the anatomy profile's command line on a small hand-made template (conftest.py's template_dir),
so nilearn's MNI files are not needed here; without any template the dry run falls back to the demo profile."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile

import pytest


pytestmark = pytest.mark.slow  # the lease script in bash subprocesses, ~150 s

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_lease.sh")
OUT_FILES = {"machine.txt", "lease.log", "step.log", "step.json", "loader.log", "epoch.json", "study.log", "study.tgz"}


@pytest.fixture(scope="module")
def leases(tmp_path_factory, template_dir):
    """The two dry runs, started at once (2 cores: about half the wall time of one after the other): ``full`` with
    the dry run's own LEASE_S, ``short`` with LEASE_S 1500, which leaves the step section alone time to run (the
    later sections need 1490 s in a dry run). Each: OUT and lease.log's text."""
    runs = {}
    try:
        for name, env in (("full", {}), ("short", {"LEASE_S": "1500"})):
            tmp = tmp_path_factory.mktemp(name)
            run_env = {
                **os.environ,
                "DRY_RUN": "1",
                "OUT": str(tmp / "out"),
                "WORK": str(tmp / "work"),
                "PYTHON": sys.executable,
                "TEMPLATE_DIR": template_dir,
                **env,
            }
            with open(tmp / "stdout.txt", "w") as stdout:  # a file: a full pipe would stall the run not read first
                proc = subprocess.Popen(["bash", SCRIPT], env=run_env, stdout=stdout, stderr=subprocess.STDOUT)
            runs[name] = (str(tmp / "out"), str(tmp / "stdout.txt"), proc)
        result = {}
        for name, (out, stdout, proc) in runs.items():
            proc.wait(timeout=3600)
            with open(stdout) as f:
                assert proc.returncode == 0, f.read()[-4000:]
            with open(os.path.join(out, "lease.log")) as f:
                result[name] = (out, f.read())
    finally:
        for _, _, proc in runs.values():
            if proc.poll() is None:
                proc.kill()
    return result


def _check_out_names(out: str) -> set[str]:
    """What comes back from a lease: at most 8 files, named in letters, digits, '.', '_' and '-'."""
    names = set(os.listdir(out))
    assert len(names) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", n) for n in names), names
    return names


def _check_step(out: str) -> None:
    with open(os.path.join(out, "step.json")) as f:
        step = json.load(f)
    results = step["results"]
    assert {r["variant"] for r in results} == {"full", "baseline"}
    assert all(r["size"] == 32 and r["sec_per_step"] > 0 for r in results)


def test_dry_run_writes_every_section_under_out(leases):
    out, lease = leases["full"]
    assert _check_out_names(out) == OUT_FILES
    with open(os.path.join(out, "machine.txt")) as f:
        machine = f.read()
    assert "torch" in machine and "nproc" in machine and "packages" in machine and "monai" in machine
    for name in ("step", "loader", "study"):
        assert re.search(rf"section {name}: exit 0 after \d+ s", lease), lease
    assert lease.rstrip().splitlines()[-2].endswith("sections skipped for lack of time: none"), lease

    _check_step(out)  # a. the training step: full and baseline
    with open(os.path.join(out, "epoch.json")) as f:  # b. two real epochs of the bundle's training, loader timed
        epoch = json.load(f)
    assert [e["epoch"] for e in epoch["epochs"]] == [1, 2]
    assert all(e["iterations"] == 2 and 0 <= e["loader_wait_pct"] <= 100 and e["wall_s"] > 0 for e in epoch["epochs"])

    # c. the study: the anatomy profile's command line, and one record per finished run, packed
    with open(os.path.join(out, "study.log")) as f:
        study_log = f.read()
    assert "--profile anatomy" in study_log and "ablation: summary of 1 runs" in study_log, study_log
    assert "study: 1 run record(s) packed into study.tgz: baseline/seed0" in lease, lease
    with tarfile.open(os.path.join(out, "study.tgz")) as tar:
        names = tar.getnames()
        records = sorted(n for n in names if n.endswith("record.json"))
        assert records == ["anatomy_3d/runs/baseline/seed0/record.json"]
        assert not [n for n in names if "/models" in n or "/eval" in n]  # no weights, no TensorBoard events
        for name in records:
            record = json.load(tar.extractfile(name))
            assert record["seed"] == 0 and record["overrides"]["roi_size"] == [16, 16, 16]
            per_case = record["evaluation"]["per_case"]["raw"]
            assert len(per_case) == 15 and all(len(v["dice"]) == 1 for v in per_case.values())  # 15 combos x 1 case
        datalist = json.load(tar.extractfile("anatomy_3d/lease_data/datalist.json"))
        assert [len(datalist[k]) for k in ("training", "validation", "testing")] == [2, 1, 1]
        sums = tar.extractfile("anatomy_3d/lease_data/data_sha256.txt").read().decode()
        assert sums.splitlines()[-1].endswith("all voxels") and sums.count(".nii.gz") == 20  # 4 cases x 5 files
        assert "anatomy_3d/table3.md" in names


def test_too_small_lease_skips_the_later_sections(leases):
    # 1500 s less the 5 s margin: the step section starts; after it less is left than the 1490 s the dry run's loader
    # and study sections need, however long the step took
    out, lease = leases["short"]
    assert re.search(r"section step: exit 0 after \d+ s", lease), lease
    assert "section loader: SKIPPED for lack of time" in lease and "section study: SKIPPED for lack of time" in lease
    assert "sections skipped for lack of time: loader study" in lease
    assert _check_out_names(out) == {"machine.txt", "lease.log", "step.log", "step.json"}  # what was done is kept
    _check_step(out)
