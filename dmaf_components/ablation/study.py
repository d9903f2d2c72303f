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

:class:`AblationStudy` holds a study's choices and coordinates: the settings and their overrides
(:mod:`.settings`), the runs' processes (:mod:`.runner`), their records (:mod:`.records`) and the summary
(:mod:`.report`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..bundle_args import canonical_key, deprecated_overrides
from ..data.constants import DMAFDataError
from ..errors import DMAFConfigError
from ..data.io import read_datalist
from . import records as rec
from .report import summarize_records, write_summary
from .runner import AblationRunError, BundleRunner, latest_checkpoint, run_in_slots
from .settings import (
    BUNDLE_DIR,
    DATASET_CONFIGS,
    check_override_keys,
    check_reserved_overrides,
    parse_seeds,
    resolve_settings,
    run_overrides,
)

__all__ = ["AblationStudy"]


class AblationStudy:
    """Train and evaluate each Table-3 setting for each seed through the bundle; summarise with paired intervals.

    Args:
        dataset: ``brats``, ``msd`` (3-D) or ``myops`` (2-D): selects the bundle configs.
        data_dir: the dataset folder (``--dataset_dir``).
        out: the study folder (``runs/<setting>/seed<k>/`` and the summary files).
        settings: ``table3`` or names (see :data:`~.settings.SETTINGS`); the baseline is always included unless
            ``reference`` is given.
        seeds: number of seeds (0 .. seeds-1) or explicit seeds.
        datalist: datalist file (default ``data_dir/datalist.json``).
        overrides: further bundle overrides for every run, e.g. ``{"epochs": 50}`` (an old key name, ``max_epochs``, is
            renamed to the model zoo's); they may not set the seed or
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

    latest_checkpoint = staticmethod(latest_checkpoint)

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
        log: Callable[[str], None] | None = None,
        jobs: int = 1,
        reference: str | None = None,
    ) -> None:
        self.dataset = dataset.lower()
        if self.dataset not in DATASET_CONFIGS:
            raise DMAFConfigError(f"dataset: expected one of {sorted(DATASET_CONFIGS)}, got {dataset!r}")
        self.data_dir = os.path.abspath(str(data_dir))  # (python-fire passes a name such as 1 as an int)
        if not os.path.isdir(self.data_dir):
            raise DMAFDataError(f"{data_dir}: dataset folder not found")
        self.out = os.path.abspath(str(out))
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise DMAFConfigError(f"--out {out}: is a file, not a study folder")
        self.reference = os.path.abspath(str(reference)) if reference else None
        if self.reference is not None and not os.path.isdir(os.path.join(self.reference, "runs")):
            raise DMAFConfigError(f"--reference {reference}: not a study folder (no runs/ inside)")
        if self.reference == self.out:
            raise DMAFConfigError(f"--reference {reference}: is the study's own folder")
        self.settings = resolve_settings(settings, with_baseline=self.reference is None)
        self.seeds = parse_seeds(seeds)
        self.datalist = os.path.abspath(str(datalist) if datalist else os.path.join(self.data_dir, "datalist.json"))
        self._check_datalist()
        self.datalist_sha256 = rec.file_sha256(self.datalist)
        # a variant study may change a component's option, e.g. --dtm_scaling none (refused under the name given)
        check_reserved_overrides(overrides or {}, variant=self.reference is not None)
        # the model zoo's key names (--epochs for --max_epochs): records compare the same way under either name
        old_names = deprecated_overrides(overrides or {})
        self.overrides = {canonical_key(k): v for k, v in (overrides or {}).items()}
        self.bundle_dir = os.path.abspath(bundle_dir or BUNDLE_DIR)
        if not os.path.isfile(os.path.join(self.bundle_dir, "configs", "train.json")):
            raise DMAFConfigError(f"{self.bundle_dir}: not a DMAF-Net bundle (no configs/train.json)")
        check_override_keys(self.bundle_dir, self.dataset, self.overrides)
        self.reference_records()  # a reference on other data is refused now, not after the study has trained
        self.python = python or sys.executable
        self.log = log or _print_line
        for message in old_names:
            self.log(f"ablation: {message}")
        self.jobs = int(jobs)
        if self.jobs < 1:
            raise DMAFConfigError(f"--jobs: need at least 1, got {jobs}")
        self.runner = BundleRunner(self.python, self.bundle_dir, self.dataset, self.data_dir, self.datalist, self.log)

    def _check_datalist(self) -> None:
        """The datalist is read before anything runs: every run would otherwise start a bundle process only to fail
        (or, with an empty test split, to evaluate nothing). Its cases' files are ``dmaf check``'s business."""
        content = read_datalist(self.datalist)
        for section, role in (
            ("training", "trains"),
            ("validation", "picks the best model on"),
            ("testing", "evaluates on"),
        ):
            entries = content.get(section)
            if not isinstance(entries, list) or not entries:
                raise DMAFDataError(
                    f"{self.datalist}: no case in {section!r}; each run {role} it (give every "
                    "section cases, e.g. `dmaf datalist ... --split 36,6,18`)"
                )
        family = str(content.get("dataset", "")).lower()
        if family and (family == "myops") != (self.dataset == "myops"):
            raise DMAFDataError(f"{self.datalist}: a {family} datalist, but the study's dataset is {self.dataset}")

    # ------------------------------------------------------------------ runs
    def runs(self) -> list[tuple[str, int]]:
        """Every (setting, seed), seeds outermost: a partial study has whole seeds of every setting."""
        return [(name, seed) for seed in self.seeds for name in self.settings]

    def run_dir(self, setting: str, seed: int) -> str:
        return os.path.join(self.out, "runs", setting, f"seed{seed}")

    def record_path(self, setting: str, seed: int) -> str:
        return os.path.join(self.run_dir(setting, seed), rec.RECORD)

    def train_command(self, setting: str, seed: int, resume_from: str | None = None) -> list[str]:
        return self.runner.train_command(
            self.run_dir(setting, seed), seed, run_overrides(setting, self.overrides), resume_from
        )

    def evaluate_command(self, setting: str, seed: int) -> list[str]:
        return self.runner.evaluate_command(self.run_dir(setting, seed), seed, run_overrides(setting, self.overrides))

    def identity(self, setting: str, seed: int) -> dict:
        """What makes a run this study's run: its setting, seed, dataset, datalist (hash) and every bundle override.
        A finished run's record carries the same fields; an unfinished one's are in ``run.json``."""
        return rec.run_identity(
            setting, seed, self.dataset, self.datalist_sha256, run_overrides(setting, self.overrides)
        )

    def check_identity(self, setting: str, seed: int, found: Mapping, path: str, summarizing: bool = False) -> None:
        """Refuse a run made for another study: a record (or an unfinished run's ``run.json``) whose dataset,
        datalist or overrides differ from what this study asks. Reusing it would put another experiment's numbers
        in this study's table. Fields a record of an older version does not have are not compared.

        ``summarizing``: only the summary is rebuilt (nothing trains), so the advice is to name the study's overrides,
        never to delete a finished run; a summary without any override given checks the runs' overrides against
        each other instead (:meth:`records`)."""
        advice = (
            "; name the overrides the study was run with (the records hold them)"
            if summarizing
            else f"; give the study another --out, or delete {os.path.dirname(path)} to redo the run with these "
            "settings"
        )
        rec.check_identity(
            found,
            self.identity(setting, seed),
            path,
            advice,
            compare_overrides=not (summarizing and not self.overrides),
        )

    def check_existing_runs(self) -> None:
        """Every finished or started run of this study's settings and seeds was made for this study (see
        :meth:`check_identity`); checked before anything runs."""
        for setting, seed in self.runs():
            run_dir = self.run_dir(setting, seed)
            record, started = self.record_path(setting, seed), os.path.join(run_dir, rec.STARTED)
            if os.path.exists(record):
                self.check_identity(setting, seed, rec.read_record(record), record)
            elif os.path.exists(started):
                self.check_identity(setting, seed, rec.read_json(started, "run description"), started)
            elif self.latest_checkpoint(run_dir) or self.runner.trained(run_dir):
                self.log(
                    f"{run_dir}: started by a version that wrote no run.json; its overrides cannot be checked "
                    "and are taken to be this study's"
                )

    def run_one(self, setting: str, seed: int, label: str = "", env: Mapping[str, str] | None = None) -> dict:
        """Train (or continue) and evaluate one run, write its record and return it (``env``: extra environment
        of its bundle processes)."""
        run_dir = self.run_dir(setting, seed)
        os.makedirs(run_dir, exist_ok=True)
        identity = self.identity(setting, seed)
        if not self.runner.trained(run_dir):  # what the run is for (check_identity), before it trains
            rec.write_json(os.path.join(run_dir, rec.STARTED), identity)
        overrides = run_overrides(setting, self.overrides)
        times, evaluation = self.runner.train_and_evaluate(
            run_dir, seed, overrides, label or f"{setting} seed {seed}", env
        )
        record = rec.make_record(
            identity,
            overrides,
            self.data_dir,
            self.datalist,
            self.train_command(setting, seed),
            self.bundle_dir,
            env or {},
            times,
            run_dir,
            evaluation,
        )
        rec.write_json(self.record_path(setting, seed), record)  # a record exists only when complete
        return record

    def check_bundle_package(self) -> None:
        """Refuse to start when the bundle's processes would import another ``dmaf_components`` than this runner
        (:meth:`.runner.BundleRunner.check_package`): each record names the runner's code."""
        self.runner.check_package()

    def run(self) -> dict:
        """Every run not yet recorded, in order (``jobs`` at a time), with progress and a time-left estimate; then
        the summary. A failed run does not stop the others; the study raises after the rest have finished."""
        self.check_existing_runs()
        todo = [r for r in self.runs() if not os.path.exists(self.record_path(*r))]
        if todo:
            self.check_bundle_package()
        total = len(self.runs())
        jobs = min(self.jobs, max(len(todo), 1))
        self.log(
            f"ablation: {total} runs ({len(self.settings)} settings x {len(self.seeds)} seeds), "
            f"{total - len(todo)} already recorded, {len(todo)} to do"
            + (f", {jobs} at a time" if jobs > 1 else "")
            + f"; study folder {self.out}"
        )
        failures = run_in_slots(todo, self.run_one, jobs, total, self.log)
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
                record = rec.read_record(path)
                self.check_identity(setting, seed, record, path, summarizing)
                out.append(record)
        if summarizing and not self.overrides:
            rec.check_one_budget(out, self.record_path, self.log)
        return out

    def reference_records(self) -> list[dict] | None:
        """The reference study's records of this study's settings and seeds (None without a reference); refused
        when they were made on another datalist (their test cases would not pair)."""
        if self.reference is None:
            return None
        return rec.reference_records(self.reference, self.settings, self.seeds, self.datalist, self.datalist_sha256)

    def summarize(self, summarizing: bool = True) -> dict:
        """Write ``table3.csv``/``.md``/``.png`` and ``combinations.csv`` from the records; return the summary
        (``summarizing`` False: after this study's runs, whose records were checked against its overrides)."""
        reference = self.reference_records()
        if reference is not None and not reference:
            self.log(f"ablation: the reference {self.reference} has no finished run of these settings and seeds")
        records = self.records(summarizing)
        if not records:
            raise DMAFDataError(
                f"{self.out}: no finished run of settings {','.join(self.settings)} and seeds "
                f"{','.join(map(str, self.seeds))} to summarize"
            )
        done = {(r["setting"], r["seed"]) for r in records}
        missing = [f"{setting} seed {seed}" for setting, seed in self.runs() if (setting, seed) not in done]
        if missing:
            self.log(f"ablation: not finished yet, left out of the summary: {', '.join(missing)}")
        summary = summarize_records(
            records, reference=reference, reference_name=self.reference and os.path.relpath(self.reference, self.out)
        )
        if summary["rows"]:
            if summary["unpaired"]:
                self.log(
                    f"ablation: no counterpart in the {summary['compared_to']} "
                    f"for {', '.join(summary['unpaired'])}"
                    "; their differences are left out"
                )
            write_summary(summary, self.out)
            self.log(f"ablation: summary of {summary['n_records']} runs in {os.path.join(self.out, 'table3.md')}")
        return summary


def _print_line(line: str) -> None:
    sys.stdout.write(line + "\n")  # one write: lines of concurrent runs do not interleave
    sys.stdout.flush()
