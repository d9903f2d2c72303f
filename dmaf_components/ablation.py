# Copyright (c) DMAF-Net bundle contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""The paper's component-wise ablation (Table 3) as one resumable study run through the bundle itself.

Each (setting, seed) run trains with ``python -m monai.bundle run training`` and the setting's overrides, evaluates
every modality combination of the test split with ``evaluate.json``, and leaves ``record.json`` (overrides, seed,
datalist hash, package versions, timings, per-combination tables and per-case values) in its own folder. A run with a
record is never redone; a run killed during training continues from its last checkpoint (``--resume_from``). The
summary (``table3.csv``, ``table3.md``, ``table3.png``, ``combinations.csv``) is rebuilt from the records.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import math
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .data.constants import DMAFDataError
from .data.io import read_datalist
from .data.loader import available_cpus
from .stats import PairedInterval, paired_bootstrap, seed_interval

__all__ = [
    "SETTINGS",
    "setting_overrides",
    "resolve_settings",
    "paired_bootstrap",
    "validation_curve",
    "AblationStudy",
    "AblationRunError",
]

#: what every paired difference of a summary reports: the seed-level interval
#: (:func:`~dmaf_components.stats.seed_interval`) and, as a second labelled column, the case-resampling bootstrap (too
#: narrow with few seeds)
INTERVAL_NOTE = (
    "Δ: paired difference (same seeds, same test cases) with a 95 % t-interval whose unit of replication is the seed "
    "(seed-to-seed spread of the paired means plus the test cases' share, t with seeds − 1 degrees of freedom); p: "
    "exact two-sided sign-flip test over the seeds (its smallest possible value is 0.25 with 3 seeds, 0.0625 with 5, "
    "0.002 with 10); detectable: the smallest true effect these seeds detect with 80 % power; seeds for Δ: the seeds "
    "a test needs to detect an effect of the observed size with 80 % power. The case bootstrap (seeds and cases "
    "resampled) is listed last for comparison only: with few seeds it is too narrow. Per-combination intervals are "
    "uncorrected for the many, strongly correlated combinations: they describe, they are not separate tests."
)



class AblationRunError(DMAFDataError):
    """Runs of a study failed (the others finished and were summarised): one line naming the first failure and its
    log; ``dmaf`` exits with status 1."""

    exit_code = 1

#: Table 3's rows in the paper's order: name -> (DMAF fusion, distillation, DTM)
SETTINGS: dict[str, tuple[bool, bool, bool]] = {
    "baseline": (False, False, False),
    "dmaf": (True, False, False),
    "distill": (False, True, False),
    "dtm": (False, False, True),
    "dmaf+distill": (True, True, False),
    "dmaf+dtm": (True, False, True),
    "distill+dtm": (False, True, True),
    "full": (True, True, True),
}
BUNDLE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundle")
_CONFIGS = {
    "brats": ["configs/train.json"],
    "msd": ["configs/train.json"],
    "myops": ["configs/train.json", "configs/train_myops.json"],
}


def setting_overrides(name: str) -> dict[str, Any]:
    """Bundle overrides of one Table-3 setting (the components off are: concatenation fusion as in mmFormer/RFNet,
    no L_rel/L_proto, DTM monitoring only)."""
    if name not in SETTINGS:
        raise DMAFDataError(f"--settings: unknown setting {name!r}; expected table3 or some of {list(SETTINGS)}")
    dmaf, distill, dtm = SETTINGS[name]
    return {
        "fusion": "dmaf" if dmaf else "concat",
        "distillation": distill,
        "dtm_reweight": dtm,
        "dtm_scaling": "gradient" if dtm else "none",
    }


def resolve_settings(spec: str | Sequence[str], with_baseline: bool = True) -> list[str]:
    """``table3`` (all eight rows), or names separated by commas, e.g. ``baseline,full``; returned in Table 3's
    order, the baseline always first (every difference is taken against it) unless ``with_baseline`` is False (a
    study compared with a reference study instead)."""
    names = list(spec) if not isinstance(spec, str) else [s.strip() for s in spec.split(",") if s.strip()]
    if names == ["table3"]:
        return list(SETTINGS)
    for name in names:
        setting_overrides(name)
    if not names:
        raise DMAFDataError("--settings: no setting named")
    chosen = set(names) | ({"baseline"} if with_baseline else set())
    return [s for s in SETTINGS if s in chosen]


def validation_curve(run_dir: str) -> dict[str, Any]:
    """The learning curve a run logged: its validation mean Dice by epoch (``val_mean_dice`` in the TensorBoard
    events under ``run_dir/eval``; over several starts of a resumed run, a later start's value wins) and the
    iteration each epoch ended at.

    Returns:
        ``{"epoch": [...], "iteration": [...], "val_mean_dice": [...]}`` (empty lists without events).
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    dice: dict[int, float] = {}
    for path in sorted(glob.glob(os.path.join(run_dir, "eval", "events.out.tfevents.*")), key=os.path.getmtime):
        acc = EventAccumulator(path, size_guidance={"scalars": 0})
        acc.Reload()
        if "val_mean_dice" in acc.Tags()["scalars"]:
            dice.update({int(e.step): float(e.value) for e in acc.Scalars("val_mean_dice")})
    epochs = sorted(dice)
    per_epoch = None
    ckpts = glob.glob(os.path.join(run_dir, "models", "checkpoint_final.pt"))
    if ckpts:
        import torch

        try:
            state = torch.load(ckpts[0], map_location="cpu", weights_only=True, mmap=True)
            trainer = state.get("trainer", {}) if isinstance(state, Mapping) else {}
            per_epoch = int(trainer["epoch_length"]) if "epoch_length" in trainer else None
        except Exception:  # an unreadable checkpoint costs the iteration column, not the record
            per_epoch = None
    return {"epoch": epochs, "iteration": [e * per_epoch if per_epoch else None for e in epochs],
            "val_mean_dice": [dice[e] for e in epochs]}


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _cli_value(value: Any) -> str:
    """A value as ``monai.bundle run`` (python-fire) reads it back: Python literals, so False stays a bool."""
    return value if isinstance(value, str) else repr(value)


class AblationStudy:
    """Train and evaluate each Table-3 setting for each seed through the bundle; summarise with paired intervals.

    Args:
        dataset: ``brats``, ``msd`` (3-D) or ``myops`` (2-D): selects the bundle configs.
        data_dir: the dataset folder (``--dataset_dir``).
        out: the study folder (``runs/<setting>/seed<k>/`` and the summary files).
        settings: ``table3`` or names (see :data:`SETTINGS`); the baseline is always included unless ``reference``
            is given.
        seeds: number of seeds (0 .. seeds-1) or explicit seeds.
        datalist: datalist file (default ``data_dir/datalist.json``).
        overrides: further bundle overrides for every run, e.g. ``{"max_epochs": 50}``; they may not set the seed or
            the paths, nor what a setting sets (fusion, distillation, dtm_reweight, dtm_scaling) unless ``reference``
            is given (a variant such as the full model with ``dtm_scaling="none"``; the record keeps the override).
        bundle_dir: the bundle (default: the one next to this package).
        python: interpreter that runs the bundle.
        log: where progress lines go (default stdout).
        jobs: runs trained at the same time (each its own bundle process). On one GPU, small patches leave it
            mostly idle between kernel launches, so a few concurrent runs finish a study sooner; with several GPUs
            the job slots take them in turn (``CUDA_VISIBLE_DEVICES``). Each run's processes get an equal part of
            the CPUs (``OMP_NUM_THREADS``, unless set; recorded in each run's record). A different thread count
            can change float rounding (and on the CPU which convolution kernel PyTorch picks), so results match
            one-at-a-time runs closely, not bit for bit.
        reference: another study folder on the same datalist (e.g. the same settings without an override): each
            setting's paired difference is then taken against the reference's same setting and seeds instead of
            against the baseline, and the baseline is not run unless named. This measures a variant (an option, a
            budget) with the pairing of Table 3.
    """

    def __init__(
        self,
        dataset: str,
        data_dir: str,
        out: str,
        settings: str | Sequence[str] = "table3",
        seeds: int | Sequence[int] = 3,
        datalist: str | None = None,
        overrides: Mapping[str, Any] | None = None,
        bundle_dir: str | None = None,
        python: str | None = None,
        log=None,
        jobs: int = 1,
        reference: str | None = None,
    ) -> None:
        self.dataset = dataset.lower()
        if self.dataset not in _CONFIGS:
            raise DMAFDataError(f"dataset: expected one of {sorted(_CONFIGS)}, got {dataset!r}")
        self.data_dir = os.path.abspath(str(data_dir))  # (python-fire passes a name such as 1 as an int)
        if not os.path.isdir(self.data_dir):
            raise DMAFDataError(f"{data_dir}: dataset folder not found")
        self.out = os.path.abspath(str(out))
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise DMAFDataError(f"--out {out}: is a file, not a study folder")
        self.reference = os.path.abspath(str(reference)) if reference else None
        if self.reference is not None and not os.path.isdir(os.path.join(self.reference, "runs")):
            raise DMAFDataError(f"--reference {reference}: not a study folder (no runs/ inside)")
        if self.reference == self.out:
            raise DMAFDataError(f"--reference {reference}: is the study's own folder")
        self.settings = resolve_settings(settings, with_baseline=self.reference is None)
        self.seeds = _seeds(seeds)
        self.datalist = os.path.abspath(str(datalist) if datalist else os.path.join(self.data_dir, "datalist.json"))
        self._check_datalist()
        self.datalist_sha256 = _sha256(self.datalist)
        self.overrides = dict(overrides or {})
        reserved = {"seed", "bundle_root", "dataset_dir", "datalist", "data_list_file_path", "resume_from"}
        if self.reference is None:  # a variant study may change a component's option, e.g. --dtm_scaling none
            reserved |= {"fusion", "distillation", "dtm_reweight", "dtm_scaling"}
        clash = sorted(reserved & set(self.overrides))
        if clash:
            raise DMAFDataError(f"overrides {clash}: set by the study itself (settings, seeds, paths)"
                                + ("" if self.reference
                                   else "; a variant study with --reference may set the settings' keys"))
        self.bundle_dir = os.path.abspath(bundle_dir or BUNDLE_DIR)
        if not os.path.isfile(os.path.join(self.bundle_dir, "configs", "train.json")):
            raise DMAFDataError(f"{self.bundle_dir}: not a DMAF-Net bundle (no configs/train.json)")
        self._check_override_keys()
        self.reference_records()  # a reference on other data is refused now, not after the study has trained
        self.python = python or sys.executable
        self.log = log or _print_line
        self.jobs = int(jobs)
        if self.jobs < 1:
            raise DMAFDataError(f"--jobs: need at least 1, got {jobs}")

    def _check_datalist(self) -> None:
        """The datalist is read before anything runs: every run would otherwise start a bundle process only to fail
        (or, with an empty test split, to evaluate nothing). Its cases' files are ``dmaf check``'s business."""
        content = read_datalist(self.datalist)
        for section, role in (("training", "trains"), ("validation", "picks the best model on"),
                              ("testing", "evaluates on")):
            entries = content.get(section)
            if not isinstance(entries, list) or not entries:
                raise DMAFDataError(f"{self.datalist}: no case in {section!r}; each run {role} it (give every "
                                    "section cases, e.g. `dmaf datalist ... --split 36,6,18`)")
        family = str(content.get("dataset", "")).lower()
        if family and (family == "myops") != (self.dataset == "myops"):
            raise DMAFDataError(f"{self.datalist}: a {family} datalist, but the study's dataset is {self.dataset}")

    def _check_override_keys(self) -> None:
        """Every override must name a key of the bundle's configs: a typo would otherwise run the whole study
        with the default silently (``monai.bundle run`` adds unknown keys without a word). A value must be of the
        kind of the key's literal default (a number, a bool, a list), so that ``--max_epochs abc`` is refused here
        rather than in every run."""
        import difflib

        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config([os.path.join(self.bundle_dir, c)
                            for c in _CONFIGS[self.dataset] + ["configs/evaluate.json"]])
        for key in self.overrides:
            if key not in parser:
                close = difflib.get_close_matches(key, [k for k in parser.get() if isinstance(k, str)], n=1)
                hint = f"; did you mean --{close[0]}?" if close else ""
                raise DMAFDataError(f"--{key}: not a key of the bundle's configs{hint}")
            default = parser.get(key)
            for _ in range(8):  # a plain reference ("max_epochs": "@epochs") has its target's kind
                if not (isinstance(default, str) and default.startswith("@") and default[1:] in parser):
                    break
                default = parser.get(default[1:])
            _check_value(key, self.overrides[key], default)

    # ------------------------------------------------------------------ runs
    def runs(self) -> list[tuple[str, int]]:
        """Every (setting, seed), seeds outermost: a partial study has whole seeds of every setting."""
        return [(name, seed) for seed in self.seeds for name in self.settings]

    def run_dir(self, setting: str, seed: int) -> str:
        return os.path.join(self.out, "runs", setting, f"seed{seed}")

    def record_path(self, setting: str, seed: int) -> str:
        return os.path.join(self.run_dir(setting, seed), "record.json")

    def _configs(self, evaluate: bool) -> str:
        files = _CONFIGS[self.dataset] + (["configs/evaluate.json"] if evaluate else [])
        return "[" + ",".join(f"'{f}'" for f in files) + "]"

    def _args(self, setting: str, seed: int) -> list[str]:
        args = ["--dataset_dir", self.data_dir, "--datalist", self.datalist, "--bundle_root",
                self.run_dir(setting, seed), "--seed", str(seed)]
        for key, value in {**setting_overrides(setting), **self.overrides}.items():
            args += [f"--{key}", _cli_value(value)]
        return args

    def train_command(self, setting: str, seed: int, resume_from: str | None = None) -> list[str]:
        cmd = [self.python, "-m", "monai.bundle", "run", "training", "--config_file", self._configs(False)]
        return cmd + self._args(setting, seed) + (["--resume_from", resume_from] if resume_from else [])

    def evaluate_command(self, setting: str, seed: int) -> list[str]:
        return [self.python, "-m", "monai.bundle", "run", "--config_file", self._configs(True)] + self._args(
            setting, seed
        )

    def identity(self, setting: str, seed: int) -> dict:
        """What makes a run this study's run: its setting, seed, dataset, datalist (hash) and every bundle override.
        A finished run's record carries the same fields; an unfinished one's are in ``run.json``."""
        return {"setting": setting, "seed": seed, "dataset": self.dataset, "datalist_sha256": self.datalist_sha256,
                "overrides": json.loads(json.dumps({**setting_overrides(setting), **self.overrides}))}

    def check_identity(self, setting: str, seed: int, found: Mapping, path: str, summarizing: bool = False) -> None:
        """Refuse a run made for another study: a record (or an unfinished run's ``run.json``) whose dataset,
        datalist or overrides differ from what this study asks. Reusing it would put another experiment's numbers
        in this study's table. Fields a record of an older version does not have are not compared.

        ``summarizing``: only the summary is rebuilt (nothing trains), so the advice is to name the study's overrides,
        never to delete a finished run; a summary without any override given checks the runs' overrides against
        each other instead (:meth:`records`)."""
        advice = ("; name the overrides the study was run with (the records hold them)" if summarizing else
                  f"; give the study another --out, or delete {os.path.dirname(path)} to redo the run with these "
                  "settings")
        want = self.identity(setting, seed)
        for key in ("setting", "seed", "dataset", "datalist_sha256"):
            if key in found and not _same(found[key], want[key]):
                raise DMAFDataError(f"{path}: made with {key} {found[key]!r}, "
                                    f"but this study asks {want[key]!r}{advice}")
        if "overrides" in found and not (summarizing and not self.overrides):
            diff = _override_diff(found["overrides"] or {}, want["overrides"])
            if diff:
                raise DMAFDataError(f"{path}: made with other overrides: {diff}{advice}")

    def check_existing_runs(self) -> None:
        """Every finished or started run of this study's settings and seeds was made for this study (see
        :meth:`check_identity`); checked before anything runs."""
        for setting, seed in self.runs():
            run_dir = self.run_dir(setting, seed)
            record, started = self.record_path(setting, seed), os.path.join(run_dir, "run.json")
            if os.path.exists(record):
                self.check_identity(setting, seed, _read_record(record), record)
            elif os.path.exists(started):
                self.check_identity(setting, seed, _read_json(started, "run description"), started)
            elif self.latest_checkpoint(run_dir) or os.path.exists(os.path.join(run_dir, "training.done")):
                self.log(f"{run_dir}: started by a version that wrote no run.json; its overrides cannot be checked "
                         "and are taken to be this study's")

    @staticmethod
    def latest_checkpoint(run_dir: str) -> str | None:
        """The newest resumable training checkpoint of a run (epoch or iteration checkpoints), if any."""
        models = os.path.join(run_dir, "models")
        if not os.path.isdir(models):
            return None
        found = [os.path.join(models, f) for f in os.listdir(models)
                 if re.fullmatch(r"checkpoint_(epoch|iteration)=\d+\.pt", f)]
        return max(found, key=os.path.getmtime) if found else None

    def _stream(
        self, cmd: list[str], log_path: str, label: str, max_epochs: int | None, started: float,
        env: Mapping[str, str] | None = None, seconds_path: str | None = None, seconds_before: float = 0.0,
    ) -> None:
        """Run a bundle command, its output to ``log_path``; one progress line per finished epoch, and at each the
        run's training seconds so far (``seconds_before`` plus this process's) written to ``seconds_path``."""
        with open(log_path, "a", buffering=1) as log:  # line by line: a killed runner loses no output
            log.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
            log.flush()
            proc = subprocess.Popen(cmd, cwd=self.bundle_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, bufsize=1, env={**os.environ, **(env or {})})
            epoch_done = re.compile(r"SupervisedTrainer - INFO - Epoch\[(\d+)\] Complete")
            first_epoch = None  # the first epoch this process finished (a resumed run starts after its checkpoint)
            for line in proc.stdout:
                log.write(line)
                match = epoch_done.search(line)
                if match and max_epochs:
                    epoch = int(match.group(1))
                    first_epoch = epoch if first_epoch is None else first_epoch
                    left = _time_left(time.time() - started, first_epoch, epoch, max_epochs)
                    self.log(f"{label}: epoch {epoch}/{max_epochs}, run time left ~{_hms(left)}")
                    if seconds_path:  # replaced whole: a kill mid-write leaves the previous value, not a torn one
                        with open(seconds_path + ".tmp", "w") as f:
                            f.write(f"{seconds_before + time.time() - started:.1f}\n")
                        os.replace(seconds_path + ".tmp", seconds_path)
            code = proc.wait()
        if code != 0:
            raise RuntimeError(f"bundle command failed (exit {code}): {_cause(log_path)} — full log: {log_path}")

    def _max_epochs(self) -> int | None:
        for key in ("max_epochs", "epochs"):  # (max_epochs is an alias of the zoo's name, epochs)
            if key in self.overrides:
                return int(self.overrides[key])
        try:
            with open(os.path.join(self.bundle_dir, "configs", "train.json")) as f:
                config = json.load(f)
            return int(config.get("epochs", config["max_epochs"]))
        except (OSError, KeyError, ValueError):
            return None

    def run_one(self, setting: str, seed: int, label: str = "", env: Mapping[str, str] | None = None) -> dict:
        """Train (or continue) and evaluate one run, write its record and return it (``env``: extra environment
        of its bundle processes)."""
        run_dir = self.run_dir(setting, seed)
        os.makedirs(run_dir, exist_ok=True)
        log_path = os.path.join(run_dir, "bundle.log")
        label = label or f"{setting} seed {seed}"
        done_marker = os.path.join(run_dir, "training.done")
        seconds_path = os.path.join(run_dir, "training.seconds")  # training so far, over every process of the run
        start = time.time()
        resumed = False
        if not os.path.exists(done_marker):
            started = os.path.join(run_dir, "run.json")  # what the run is for (check_identity); replaced whole
            with open(started + ".tmp", "w") as f:
                json.dump(self.identity(setting, seed), f, indent=1)
            os.replace(started + ".tmp", started)
            resume = self.latest_checkpoint(run_dir)
            resumed = resume is not None
            before = _read_seconds(seconds_path) if resumed else 0.0
            self.log(f"{label}: training" + (f" (continuing from {os.path.basename(resume)})" if resume else ""))
            self._stream(self.train_command(setting, seed, resume), log_path, label, self._max_epochs(), start, env,
                         seconds_path, before)
            with open(done_marker, "w") as f:
                f.write(f"{before + time.time() - start:.1f}\n")
        else:
            resumed = True  # trained by an earlier process
        train_s = float(open(done_marker).read().strip() or "nan")
        self.log(f"{label}: evaluating every modality combination of the test split")
        eval_start = time.time()
        self._stream(self.evaluate_command(setting, seed), log_path, label, None, eval_start, env)
        results = os.path.join(run_dir, "eval", "evaluation.json")
        if not os.path.exists(results):
            raise RuntimeError(f"the evaluation wrote no {results} — full log: {log_path}")
        evaluation = _read_json(results, "evaluation")
        record = {
            "setting": setting,
            "components": dict(zip(("dmaf", "distillation", "dtm"), SETTINGS[setting])),
            "seed": seed,
            "dataset": self.dataset,
            "data_dir": self.data_dir,
            "datalist": self.datalist,
            "datalist_sha256": self.datalist_sha256,
            "overrides": {**setting_overrides(setting), **self.overrides},
            "train_command": self.train_command(setting, seed),
            "versions": _versions(),
            "code_commit": _git_commit(self.bundle_dir),
            "environment": dict(env or {}),
            "train_seconds": train_s,  # summed over the run's processes (epochs redone after a resume included)
            "train_resumed": resumed,
            "evaluate_seconds": time.time() - eval_start,
            "validation": validation_curve(run_dir),
            "evaluation": evaluation,
        }
        tmp = self.record_path(setting, seed) + ".tmp"
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1)
        os.replace(tmp, self.record_path(setting, seed))  # a record exists only when complete
        return record

    def check_bundle_package(self) -> None:
        """Refuse to start when the bundle's processes would import another ``dmaf_components`` than this runner.

        Each record names the runner's package version and code commit, so both sides must be the same code. They
        can differ silently: ``python -m`` puts the working directory first on ``sys.path``, so a runner started
        with ``python -m dmaf_components.cli`` inside a checkout imports that checkout, while the bundle's processes
        (run in the bundle folder) import what ``PYTHONPATH`` or the installation gives.
        """
        probe = "import os, dmaf_components; print(os.path.realpath(os.path.dirname(dmaf_components.__file__)))"
        out = subprocess.run([self.python, "-c", probe], cwd=self.bundle_dir, capture_output=True, text=True)
        theirs = out.stdout.strip().splitlines()[-1] if out.returncode == 0 and out.stdout.strip() else None
        ours = os.path.realpath(os.path.dirname(os.path.abspath(__file__)))
        if theirs != ours:
            raise DMAFDataError(
                "the bundle's processes import dmaf_components from "
                f"{theirs or '(nowhere: ' + out.stderr.strip()[-200:] + ')'}"
                f", this runner from {ours}: records would name the wrong code. Start the runner so that both import "
                "the same package (e.g. `python -P -m dmaf_components.cli`, or from outside the checkout)"
            )

    def run(self) -> dict:
        """Every run not yet recorded, in order (``jobs`` at a time), with progress and a time-left estimate; then
        the summary. A failed run does not stop the others; the study raises after the rest have finished."""
        self.check_existing_runs()
        todo = [r for r in self.runs() if not os.path.exists(self.record_path(*r))]
        if todo:
            self.check_bundle_package()
        total = len(self.runs())
        jobs = min(self.jobs, max(len(todo), 1))
        self.log(f"ablation: {total} runs ({len(self.settings)} settings x {len(self.seeds)} seeds), "
                 f"{total - len(todo)} already recorded, {len(todo)} to do"
                 + (f", {jobs} at a time" if jobs > 1 else "") + f"; study folder {self.out}")
        durations: list[float] = []
        failures: list[str] = []
        slots = list(range(jobs))
        visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        gpus = (len(visible) or _cuda_device_count()) if jobs > 1 else 0
        device_ids = visible or [str(i) for i in range(gpus)]
        stop = threading.Event()
        # concurrent runs share the CPUs: each gets its part of them for its own threads (evaluation's CPU work
        # with every process at the machine's full thread count oversubscribes the cores many times over)
        cpus = available_cpus()
        threads = {}
        if jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
            threads["OMP_NUM_THREADS"] = str(max(1, cpus // jobs))
        lock = threading.Lock()

        def one(i: int, setting: str, seed: int) -> None:
            if stop.is_set():  # interrupted: start nothing new
                return
            label = f"[{total - len(todo) + i + 1}/{total}] {setting} seed {seed}"
            with lock:
                slot = slots.pop(0)
                if durations:
                    left = sum(durations) / len(durations) * (len(todo) - i) / jobs
                    self.log(f"{label}: starting; study time left ~{_hms(left)}")
            env = dict(threads)
            if gpus > 1:
                env["CUDA_VISIBLE_DEVICES"] = device_ids[slot % gpus]  # the parent's own GPU list, in turn
            start = time.time()
            try:
                record = self.run_one(setting, seed, label, env)
            except Exception as e:  # noqa: BLE001  (reported below; the other runs go on)
                with lock:
                    failures.append(f"{label}: {e}")
                self.log(f"{label}: FAILED ({type(e).__name__}): {e}")
            else:
                with lock:  # a run continued from a checkpoint took only part of a run's time: not a sample of it
                    if not (record or {}).get("train_resumed"):
                        durations.append(time.time() - start)
            finally:
                with lock:
                    slots.append(slot)

        if jobs == 1:
            for i, (setting, seed) in enumerate(todo):
                one(i, setting, seed)
        else:
            from concurrent.futures import ThreadPoolExecutor

            pool = ThreadPoolExecutor(jobs)
            try:
                for future in [pool.submit(one, i, setting, seed) for i, (setting, seed) in enumerate(todo)]:
                    future.result()
            except BaseException:  # Ctrl-C: no queued run starts; the running ones end with their processes
                stop.set()
                pool.shutdown(wait=True, cancel_futures=True)
                raise
            pool.shutdown(wait=True)
        summary = self.summarize(summarizing=False) if len(failures) < len(self.runs()) else {}
        if failures:
            raise AblationRunError(f"ablation: {len(failures)} of {len(todo)} runs failed; first: {failures[0]}")
        return summary

    # ------------------------------------------------------------------ summary
    def records(self, summarizing: bool = False) -> list[dict]:
        """The finished runs' records, each checked to belong to this study (:meth:`check_identity`). When only
        summarizing without any override named, the records' overrides must agree with each other instead (beyond
        what their settings set): one study, one budget."""
        out = []
        for setting, seed in self.runs():
            path = self.record_path(setting, seed)
            if os.path.exists(path):
                record = _read_record(path)
                self.check_identity(setting, seed, record, path, summarizing)
                out.append(record)
        if summarizing and not self.overrides:
            common = {}
            for record in out:
                own = {k: v for k, v in (record.get("overrides") or {}).items()
                       if k not in setting_overrides(record["setting"])}
                if not common:
                    common = {"path": self.record_path(record["setting"], record["seed"]), "overrides": own}
                elif _override_diff(own, common["overrides"]):
                    raise DMAFDataError(f"{self.record_path(record['setting'], record['seed'])}: made with other "
                                        f"overrides than {common['path']}: {_override_diff(own, common['overrides'])}"
                                        "; the folder mixes studies")
            if common and common["overrides"]:
                self.log("ablation: the runs were made with " + " ".join(
                    f"--{k} {json.dumps(v)}" for k, v in sorted(common["overrides"].items())))
        return out

    def reference_records(self) -> list[dict] | None:
        """The reference study's records of this study's settings and seeds (None without a reference); refused
        when they were made on another datalist (their test cases would not pair)."""
        if self.reference is None:
            return None
        out, sha = [], self.datalist_sha256
        for path in sorted(glob.glob(os.path.join(self.reference, "runs", "*", "seed*", "record.json"))):
            record = _read_json(path, "record")
            if record.get("setting") not in self.settings or record.get("seed") not in self.seeds:
                continue
            if record.get("datalist_sha256") != sha:
                raise DMAFDataError(f"{path}: datalist_sha256 differs from {self.datalist}'s; the reference study was "
                                    "made on other data and cannot be paired")
            out.append(record)
        return out

    def summarize(self, summarizing: bool = True) -> dict:
        """Write ``table3.csv``/``.md``/``.png`` and ``combinations.csv`` from the records; return the summary
        (``summarizing`` False: after this study's runs, whose records were checked against its overrides)."""
        reference = self.reference_records()
        if reference is not None and not reference:
            self.log(f"ablation: the reference {self.reference} has no finished run of these settings and seeds")
        records = self.records(summarizing)
        if not records:
            raise DMAFDataError(f"{self.out}: no finished run of settings {','.join(self.settings)} and seeds "
                                f"{','.join(map(str, self.seeds))} to summarize")
        done = {(r["setting"], r["seed"]) for r in records}
        missing = [f"{setting} seed {seed}" for setting, seed in self.runs() if (setting, seed) not in done]
        if missing:
            self.log(f"ablation: not finished yet, left out of the summary: {', '.join(missing)}")
        summary = summarize_records(records, reference=reference,
                                    reference_name=self.reference and os.path.relpath(self.reference, self.out))
        if summary["rows"]:
            if summary["unpaired"]:
                self.log(f"ablation: no counterpart in the {summary['compared_to']} "
                         f"for {', '.join(summary['unpaired'])}"
                         "; their differences are left out")
            write_summary(summary, self.out)
            self.log(f"ablation: summary of {summary['n_records']} runs in {os.path.join(self.out, 'table3.md')}")
        return summary


_UNSET = "(not set)"


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON values, with True not equal to 1 (a bool override is not a number override)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _override_diff(had: Mapping, asked: Mapping) -> str:
    """``--key had (now asked)`` for every override that differs, or ''."""
    show = lambda v: v if v is _UNSET else repr(v)  # noqa: E731
    return ", ".join(f"--{k} {show(had.get(k, _UNSET))} (now {show(asked.get(k, _UNSET))})"
                     for k in sorted(set(had) | set(asked)) if not _same(had.get(k, _UNSET), asked.get(k, _UNSET)))


def _read_record(path: str) -> dict:
    record = _read_json(path, "record")
    missing = [k for k in ("setting", "seed", "evaluation") if not isinstance(record, dict) or k not in record]
    if missing:
        raise DMAFDataError(f"{path}: not a run record (no {', '.join(missing)})")
    return record


def _seeds(seeds: Any) -> list[int]:
    """``--seeds``: a count N (seeds 0 .. N-1) or distinct seeds, e.g. ``[0,2,5]``."""
    if isinstance(seeds, str) and seeds.strip().lstrip("-").isdigit():
        seeds = int(seeds)
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        if seeds < 1:
            raise DMAFDataError(f"--seeds: need at least one seed, got {seeds} (seed 0 alone: --seeds [0])")
        return list(range(seeds))
    if isinstance(seeds, (list, tuple)) and seeds and all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds
    ):
        if len(set(seeds)) != len(seeds):
            raise DMAFDataError(f"--seeds: seed given twice in {list(seeds)}")
        return list(seeds)
    raise DMAFDataError(f"--seeds: need a count (e.g. 3) or a list of distinct seeds >= 0 (e.g. [0,2]), got {seeds!r}")


def _check_value(key: str, value: Any, default: Any) -> None:
    """An override's value must be of the kind of the key's literal default; MONAI references and expressions
    (``@key``, ``$...``) and string defaults are not checked."""
    if isinstance(value, str) and value.startswith(("@", "$")):
        return
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, bool):
        ok, kind = isinstance(value, bool), "True or False"
    elif isinstance(default, int):
        ok, kind = is_number and isinstance(value, int), "a whole number"
    elif isinstance(default, float):
        ok, kind = is_number, "a number"
    elif isinstance(default, list):
        ok, kind = isinstance(value, (list, tuple)), "a list such as [96,96]"
    else:
        return
    if not ok:
        raise DMAFDataError(f"--{key}: expected {kind} (the bundle's default is {default!r}), got {value!r}")


def _read_json(path: str, what: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise DMAFDataError(f"{path}: cannot read the {what} ({exc})") from None


def _cause(log_path: str) -> str:
    """The line of a failed bundle command's log that says why, from the last process's output (the log holds every
    process of the run): the project's own data error if there is one, else the last exception line, else the last
    line."""
    try:
        lines = [line.strip() for line in open(log_path, errors="replace").read().splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    starts = [i for i, line in enumerate(lines) if line.startswith("$ ")]  # each process's command line
    lines = lines[starts[-1] + 1:] if starts else lines  # the failed process is the last one
    errors = [line for line in lines if re.match(r"^[\w.]*(Error|Exception)\b.*?: ", line)]
    own = [line for line in errors if "DMAFDataError" in line]
    return (own or errors or lines or ["(no output)"])[-1]


def _print_line(line: str) -> None:
    sys.stdout.write(line + "\n")  # one write: lines of concurrent runs do not interleave
    sys.stdout.flush()


def _cuda_device_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001  (no usable torch: no GPUs to share out)
        return 0


def _time_left(elapsed: float, first_epoch: int, epoch: int, max_epochs: int) -> float:
    """Seconds left in a training run, from this process's pace: ``epoch - first_epoch + 1`` epochs finished in
    ``elapsed`` seconds (a resumed run's first epoch is the one after its checkpoint, not 1)."""
    return elapsed / max(epoch - first_epoch + 1, 1) * (max_epochs - epoch)


def _read_seconds(path: str) -> float:
    """A run's training seconds so far (``training.seconds``); 0 where an earlier version wrote none. A resumed run's
    record then counts only the processes that wrote it."""
    try:
        with open(path) as f:
            return float(f.read().strip())
    except (OSError, ValueError):
        return 0.0


def _hms(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return (f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600
            else f"{seconds // 60}m{seconds % 60:02d}s")


def _git_commit(path: str) -> str | None:
    """The commit of the checkout that holds the bundle, with ``+dirty`` when it has uncommitted changes."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=path,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _versions() -> dict[str, str]:
    import monai
    import torch

    from . import __version__

    return {"dmaf_components": __version__, "monai": monai.__version__, "torch": torch.__version__,
            "python": sys.version.split()[0]}


def _case_values(record: dict, metric: str) -> np.ndarray:
    """``(combinations, cases, regions)`` per-case values of one run (raw predictions)."""
    per_case = record["evaluation"]["per_case"]["raw"]
    return np.array([per_case[c][metric] for c in per_case], dtype=np.float64)


def _components(record: dict, setting: str) -> tuple[bool, bool, bool]:
    """(DMAF, distillation, DTM) a run trained with: from its overrides (a variant study may change them), else from
    its setting's name."""
    ov = record.get("overrides")
    if not ov:
        return SETTINGS[setting]
    dtm = bool(ov.get("dtm_reweight", True)) or ov.get("dtm_scaling", "gradient") != "none"
    return ov.get("fusion", "dmaf") == "dmaf", bool(ov.get("distillation", True)), dtm


def _override_changes(pairs: Sequence[tuple[dict, dict]]) -> dict[str, str]:
    """What the runs' overrides set differently from their reference runs': ``{key: "value (reference: value)"}``."""
    changes: dict[str, set[str]] = {}
    for run, ref in pairs:
        a, b = run.get("overrides") or {}, ref.get("overrides") or {}
        for key in sorted(set(a) | set(b)):
            if a.get(key, "default") != b.get(key, "default"):
                changes.setdefault(key, set()).add(f"{a.get(key, 'default')} (reference: {b.get(key, 'default')})")
    return {key: "; ".join(sorted(values)) for key, values in changes.items()}


_COMPONENTS = ("DMAF", "distillation", "DTM")


def component_effects(by_setting: Mapping[str, Mapping[int, dict]]) -> list[dict]:
    """Each component's effect on the average DSC in the factorial design of Table 3, when all eight settings are
    there: ``averaged`` is its paired difference (with - without, the other two components held fixed) averaged over
    the four combinations of the other two (its main effect); ``in_full`` is the full model minus the full model
    without it. Paired by seed and test case over the seeds every setting has, with
    :func:`~dmaf_components.stats.seed_interval`.

    Returns:
        one dict per component: ``component``, ``averaged`` and ``in_full`` as
        :class:`~dmaf_components.stats.PairedInterval`, ``seeds``.
    """
    if not all(name in by_setting for name in SETTINGS):
        return []
    seeds = sorted(set.intersection(*(set(by_setting[name]) for name in SETTINGS)))
    if not seeds:
        return []
    name_of = {flags: name for name, flags in SETTINGS.items()}

    def cell(setting: str) -> np.ndarray:  # (seeds, cases): average DSC over combinations and regions
        return np.stack([np.nanmean(np.nanmean(_case_values(by_setting[setting][s], "dice"), axis=2), axis=0)
                         for s in seeds])

    out = []
    for c, component in enumerate(_COMPONENTS):
        contexts = []
        for flags in SETTINGS.values():
            if flags[c]:
                without = tuple(False if i == c else f for i, f in enumerate(flags))
                contexts.append(cell(name_of[flags]) - cell(name_of[without]))
        in_full = cell("full") - cell(name_of[tuple(i != c for i in range(len(_COMPONENTS)))])
        out.append({"component": component, "averaged": seed_interval(np.mean(contexts, axis=0)),
                    "in_full": seed_interval(in_full), "seeds": len(seeds)})
    return out


def summarize_records(
    records: Sequence[dict], reference: Sequence[dict] | None = None, reference_name: str | None = None
) -> dict:
    """Mean ± std over seeds per setting and region (averaged over every modality combination, as Table 3), the
    per-combination means, and the paired difference of each setting's average DSC/HD95 to the baseline with the
    seed-level interval of :func:`~dmaf_components.stats.seed_interval` (and, labelled ``_boot``, the case-resampling
    bootstrap for comparison); with ``reference`` records, to the reference's same setting instead."""
    by_setting: dict[str, dict[int, dict]] = {}
    for r in records:
        by_setting.setdefault(r["setting"], {})[r["seed"]] = r
    rows, combo_rows = [], []
    if not records:
        return {"rows": rows, "combinations": combo_rows, "regions": [], "n_records": 0, "compared_to": "baseline"}
    regions = records[0]["evaluation"]["regions"]
    combos = list(records[0]["evaluation"]["per_case"]["raw"])
    ref_by_setting: dict[str, dict[int, dict]] = {}
    for r in reference or []:
        ref_by_setting.setdefault(r["setting"], {})[r["seed"]] = r
    unpaired: list[str] = []
    pairs: list[tuple[dict, dict]] = []
    for setting in [s for s in SETTINGS if s in by_setting]:
        base = by_setting.get("baseline", {}) if reference is None else ref_by_setting.get(setting, {})
        runs = by_setting[setting]
        seeds = sorted(runs)
        row: dict[str, Any] = {"setting": setting,
                               **dict(zip(("dmaf", "distillation", "dtm"), _components(runs[seeds[0]], setting))),
                               "seeds": len(seeds)}
        if setting != "baseline" or reference is not None:
            row["paired_seeds"] = sum(s in base for s in seeds)
            unpaired += [f"{setting} seed {s}" for s in seeds if s not in base]
            pairs += [(runs[s], base[s]) for s in seeds if s in base]
        for metric, name in (("dice", "DSC"), ("hd95", "HD95")):
            vals = np.stack([_case_values(runs[s], metric) for s in seeds])  # (seeds, combos, cases, regions)
            per_seed = np.nanmean(vals, axis=2).mean(axis=1)  # combination means, then their mean (Table 3)
            for r, region in enumerate(regions):
                row[f"{name}_{region}"] = float(per_seed[:, r].mean())
                row[f"{name}_{region}_std"] = float(per_seed[:, r].std(ddof=1)) if len(seeds) > 1 else math.nan
            avg = np.nanmean(per_seed, axis=1)
            row[f"{name}_avg"] = float(avg.mean())
            row[f"{name}_avg_std"] = float(avg.std(ddof=1)) if len(seeds) > 1 else math.nan
            paired = [s for s in seeds if s in base]
            if (setting != "baseline" or reference is not None) and paired:
                cell = lambda rec: np.nanmean(np.nanmean(_case_values(rec, metric), axis=2), axis=0)  # noqa: E731
                diffs = np.stack([cell(runs[s]) - cell(base[s]) for s in paired])  # (seeds, cases)
                _interval_columns(row, f"{name}_avg_diff", diffs)
                for s, d in zip(paired, diffs):  # the same difference, seed by seed
                    row[f"{name}_avg_diff_seed{s}"] = float(np.nanmean(d))
            for c, combo in enumerate(combos):
                if metric != "dice":
                    continue
                crow: dict[str, Any] = {"setting": setting, "combination": combo,
                                        "DSC_avg": float(np.nanmean(vals[:, c])), "seeds": len(seeds)}
                for r, region in enumerate(regions):
                    crow[f"DSC_{region}"] = float(np.nanmean(vals[:, c, :, r]))
                    if (setting != "baseline" or reference is not None) and paired:
                        ref_vals = np.stack([_case_values(base[s_], metric)[c, :, r] for s_ in paired])
                        run_vals = np.stack([_case_values(runs[s_], metric)[c, :, r] for s_ in paired])
                        iv = seed_interval(run_vals - ref_vals, power_analysis=False)  # (seeds, cases), one region
                        crow[f"DSC_{region}_diff"], crow[f"DSC_{region}_diff_low"] = iv.mean, iv.low
                        crow[f"DSC_{region}_diff_high"], crow[f"DSC_{region}_diff_p"] = iv.high, iv.p
                combo_rows.append(crow)
        rows.append(row)
    compared_to = "baseline" if reference is None else f"reference {reference_name or 'study'}"
    return {"rows": rows, "combinations": combo_rows, "regions": regions, "n_records": len(records),
            "compared_to": compared_to, "unpaired": unpaired, "effects": component_effects(by_setting),
            "changes": _override_changes(pairs) if reference is not None else {}}


def _interval_columns(row: dict, key: str, diffs: np.ndarray) -> PairedInterval:
    """Write the paired difference ``diffs`` ``(seeds, cases)`` into ``row`` under ``key``: the mean, the seed-level
    interval (``_low``/``_high``), its sign-flip ``_p``, ``_detectable`` and ``_needs_seeds``, and the case
    bootstrap (``_boot_low``/``_boot_high``)."""
    iv = seed_interval(diffs)
    row[key], row[f"{key}_low"], row[f"{key}_high"], row[f"{key}_p"] = iv.mean, iv.low, iv.high, iv.p
    row[f"{key}_detectable"], row[f"{key}_needs_seeds"] = iv.detectable, iv.seeds_needed
    _, row[f"{key}_boot_low"], row[f"{key}_boot_high"] = paired_bootstrap(diffs)
    return iv


def write_summary(summary: dict, out: str) -> None:
    """``table3.csv`` (every column), ``table3.md`` (Table 3's layout, mean ± std, paired differences, each
    component's effect), ``combinations.csv`` (average DSC per setting and modality combination), ``effects.csv``
    (:func:`component_effects`, when all eight settings are there) and ``table3.png``."""
    rows, regions = summary["rows"], summary["regions"]
    os.makedirs(out, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(os.path.join(out, "table3.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    for stale in ("effects.csv", "table3.png"):  # written again below only when this summary has them
        if os.path.exists(os.path.join(out, stale)):
            os.remove(os.path.join(out, stale))
    if summary.get("effects"):
        with open(os.path.join(out, "effects.csv"), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["component", "averaged", "averaged_low", "averaged_high", "averaged_p", "in_full",
                             "in_full_low", "in_full_high", "in_full_p", "seeds"])
            for e in summary["effects"]:
                a, f_ = e["averaged"], e["in_full"]
                writer.writerow([e["component"], a.mean, a.low, a.high, a.p, f_.mean, f_.low, f_.high, f_.p,
                                 e["seeds"]])
    with open(os.path.join(out, "combinations.csv"), "w", newline="") as f:
        fields = list(dict.fromkeys(k for c in summary["combinations"] for k in c))
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(summary["combinations"])

    def pm(row, key):
        std = row.get(key + "_std", math.nan)
        return f"{row[key]:.2f}" + ("" if math.isnan(std) else f" ± {std:.2f}")

    def diff(row, name):
        if f"{name}_avg_diff" not in row:
            return "–"
        key = f"{name}_avg_diff"
        text = f"{row[key]:+.2f} {_ci(row[f'{key}_low'], row[f'{key}_high'])}"
        paired = row.get("paired_seeds", row["seeds"])
        return text + (f" ({paired} of {row['seeds']} seeds paired)" if paired < row["seeds"] else "")

    compared_to = summary.get("compared_to", "baseline")
    vs = "baseline" if compared_to == "baseline" else "reference"
    tick = lambda v: "•" if v else "–"  # noqa: E731
    head = (["DMAF", "Distillation", "DTM"] + [f"DSC {r}" for r in regions] + ["DSC Avg."]
            + [f"HD95 {r}" for r in regions] + ["HD95 Avg.", f"Δ DSC Avg. vs {vs} [95% CI over seeds]",
                                                 "Δ HD95 Avg. [95% CI over seeds]", "seeds"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [tick(row["dmaf"]), tick(row["distillation"]), tick(row["dtm"])]
        cells += [pm(row, f"DSC_{r}") for r in regions] + [pm(row, "DSC_avg")]
        cells += [pm(row, f"HD95_{r}") for r in regions] + [pm(row, "HD95_avg")]
        cells += [diff(row, "DSC"), diff(row, "HD95"), str(row["seeds"])]
        lines.append("| " + " | ".join(cells) + " |")
    combos = list(dict.fromkeys(c["combination"] for c in summary["combinations"]))
    settings = [r["setting"] for r in rows]
    value = {(c["setting"], c["combination"]): c["DSC_avg"] for c in summary["combinations"]}
    lines += ["", "Average DSC [%] per modality combination (mean over seeds):", "",
              "| combination | " + " | ".join(settings) + " |", "|" + "---|" * (len(settings) + 1)]
    for combo in combos:
        lines.append(f"| {combo} | " + " | ".join(f"{value[(s, combo)]:.2f}" for s in settings) + " |")
    seeds = sorted({int(k.rsplit("seed", 1)[1]) for r in rows for k in r if k.startswith("DSC_avg_diff_seed")})
    tested = [r for r in rows if "DSC_avg_diff" in r]
    if tested:
        lines += ["", f"Δ DSC Avg. vs {vs}: the evidence behind each interval:", "",
                  "| setting | Δ [95% CI over seeds] | p (sign-flip) | detectable (80% power) | seeds for Δ "
                  "| case bootstrap [95%] (too narrow) |", "|---|---|---|---|---|---|"]
        for row in tested:
            k = "DSC_avg_diff"
            need = row[f"{k}_needs_seeds"]
            need_text = "–" if math.isnan(need) else ("> 1000" if math.isinf(need) else f"{need:.0f}")
            lines.append(f"| {row['setting']} | {row[k]:+.2f} {_ci(row[f'{k}_low'], row[f'{k}_high'])} | "
                         f"{row[f'{k}_p']:.3g} | {row[f'{k}_detectable']:.2f} | {need_text} | "
                         f"{_ci(row[f'{k}_boot_low'], row[f'{k}_boot_high'])} |")
    if seeds:
        lines += ["", f"Paired difference of the average DSC to the {vs}, seed by seed:", "",
                  "| setting | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|" + "---|" * (len(seeds) + 1)]
        for row in [r for r in rows if "DSC_avg_diff" in r]:
            lines.append(f"| {row['setting']} | " + " | ".join(
                f"{row[f'DSC_avg_diff_seed{s}']:+.2f}" if f"DSC_avg_diff_seed{s}" in row else "–" for s in seeds)
                + " |")
    effects = summary.get("effects") or []
    if effects:
        ci = lambda e: f"{e.mean:+.2f} {_ci(e.low, e.high)} (p {e.p:.3g})"  # noqa: E731
        lines += ["", f"Each component's effect on the average DSC ({effects[0]['seeds']} seeds; "
                  "paired differences with "
                  "a 95 % interval over seeds and the sign-flip p): averaged over the four combinations of the other "
                  "two components, and in the full model (full minus full without it):", "",
                  "| component | averaged over the other two | in the full model |", "|---|---|---|"]
        lines += [f"| {e['component']} | {ci(e['averaged'])} | {ci(e['in_full'])} |" for e in effects]
    against = ("the baseline" if compared_to == "baseline"
               else f"the same setting of the {compared_to}")
    note = ("Mean ± std over seeds of the average over every modality combination of the test split (as the paper's "
            f"Table 3), compared with {against}. " + INTERVAL_NOTE)
    if summary.get("changes"):
        note += " The runs differ from the reference in: " + ", ".join(
            f"{key} = {value}" for key, value in summary["changes"].items()) + "."
    if summary.get("unpaired"):
        note += " Without a counterpart (left out of Δ): " + ", ".join(summary["unpaired"]) + "."
    with open(os.path.join(out, "table3.md"), "w") as f:
        f.write(note + "\n\n" + "\n".join(lines) + "\n")
    _plot(rows, os.path.join(out, "table3.png"), vs)


def _ci(low: float, high: float) -> str:
    """``[low, high]`` with signs; ``[n/a]`` where one seed cannot give an interval."""
    return "[n/a]" if math.isnan(low) or math.isnan(high) else f"[{low:+.2f}, {high:+.2f}]"


def _plot(rows: Sequence[dict], path: str, vs: str = "baseline") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [r for r in rows if "DSC_avg_diff" in r]
    if not others:
        return
    fig, ax = plt.subplots(figsize=(6, 0.45 * len(others) + 1.5))
    y = np.arange(len(others))
    mean = np.array([r["DSC_avg_diff"] for r in others])
    err = np.array([[m - r["DSC_avg_diff_low"], r["DSC_avg_diff_high"] - m] for m, r in zip(mean, others)]).T
    ax.errorbar(mean, y, xerr=np.nan_to_num(err), fmt="o", capsize=3)  # one seed: no interval
    ax.axvline(0, color="grey", lw=1)
    ax.set_yticks(y, [r["setting"] for r in others])
    ax.set_xlabel(f"Δ average DSC vs {vs} [%] (95 % interval over seeds)")
    ax.set_title("Table 3 ablation: paired differences")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
