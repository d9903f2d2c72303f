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
"""Running a study's runs: each run's bundle processes (train, then evaluate), resumed from the last checkpoint of a
run killed during training, and the runs of a study in job slots (several at a time, GPUs and CPUs shared out).

A run's folder holds its bundle processes' output (``bundle.log``), its training seconds so far
(``training.seconds``), ``training.done`` once trained, and what the bundle writes (``models/``, ``eval/``).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..data.atomic import atomic_replace
from ..errors import DMAFRunError
from ..data.loader import available_cpus
from .records import read_json
from .settings import bundle_args, config_files

__all__ = ["AblationRunError", "BundleRunner", "latest_checkpoint", "run_in_slots"]


class AblationRunError(DMAFRunError):
    """Runs of a study failed (the others finished and were summarised): one line naming the first failure and its
    log; ``dmaf`` exits with status 1."""

    exit_code = 1


def latest_checkpoint(run_dir: str) -> str | None:
    """The newest resumable training checkpoint of a run (epoch or iteration checkpoints), if any."""
    models = os.path.join(run_dir, "models")
    if not os.path.isdir(models):
        return None
    found = [
        os.path.join(models, f) for f in os.listdir(models) if re.fullmatch(r"checkpoint_(epoch|iteration)=\d+\.pt", f)
    ]
    return max(found, key=os.path.getmtime) if found else None


class BundleRunner:
    """Runs one run's bundle processes: ``python -m monai.bundle run`` in the bundle folder, on one dataset.

    Args:
        python: interpreter that runs the bundle.
        bundle_dir: the bundle (the processes' working directory).
        dataset: ``brats``, ``msd`` or ``myops``: selects the bundle configs.
        data_dir: the dataset folder (``--dataset_dir``).
        datalist: the datalist file (``--datalist``).
        log: where progress lines go.
    """

    def __init__(
        self, python: str, bundle_dir: str, dataset: str, data_dir: str, datalist: str, log: Callable[[str], None]
    ) -> None:
        self.python, self.bundle_dir, self.log = python, bundle_dir, log
        self.dataset, self.data_dir, self.datalist = dataset, data_dir, datalist

    def train_command(
        self, run_dir: str, seed: int, overrides: Mapping[str, Any], resume_from: str | None = None
    ) -> list[str]:
        """The command that trains a run (with every override of :func:`~.settings.run_overrides`)."""
        cmd = [self.python, "-m", "monai.bundle", "run", "training", "--config_file", config_files(self.dataset, False)]
        return cmd + self._args(run_dir, seed, overrides) + (["--resume_from", resume_from] if resume_from else [])

    def evaluate_command(self, run_dir: str, seed: int, overrides: Mapping[str, Any]) -> list[str]:
        """The command that evaluates a trained run on every modality combination of the test split."""
        return [self.python, "-m", "monai.bundle", "run", "--config_file", config_files(self.dataset, True)] + (
            self._args(run_dir, seed, overrides)
        )

    def _args(self, run_dir: str, seed: int, overrides: Mapping[str, Any]) -> list[str]:
        return bundle_args(self.data_dir, self.datalist, run_dir, seed, overrides)

    def max_epochs(self, overrides: Mapping[str, Any]) -> int | None:
        """The epochs a run trains (for its progress lines): an override's, else the bundle's default."""
        for key in ("max_epochs", "epochs"):  # (max_epochs is an alias of the zoo's name, epochs)
            if key in overrides:
                return int(overrides[key])
        try:
            with open(os.path.join(self.bundle_dir, "configs", "train.json")) as f:
                config = json.load(f)
            return int(config.get("epochs", config["max_epochs"]))
        except (OSError, KeyError, ValueError):
            return None

    @staticmethod
    def trained(run_dir: str) -> bool:
        """Whether a run's training has finished (it is evaluated next)."""
        return os.path.exists(os.path.join(run_dir, "training.done"))

    def train_and_evaluate(
        self, run_dir: str, seed: int, overrides: Mapping[str, Any], label: str, env: Mapping[str, str] | None = None
    ) -> tuple[dict[str, Any], Any]:
        """Train a run (or continue it from its last checkpoint), then evaluate it; ``env``: extra environment of
        its bundle processes.

        Returns:
            the run's times (``train_seconds`` over every process of the run, ``train_resumed``,
            ``evaluate_seconds``) and the evaluation the bundle wrote (``eval/evaluation.json``).
        """
        os.makedirs(run_dir, exist_ok=True)
        log_path = os.path.join(run_dir, "bundle.log")
        done_marker = os.path.join(run_dir, "training.done")
        seconds_path = os.path.join(run_dir, "training.seconds")  # training so far, over every process of the run
        start = time.time()
        resumed = False
        if not os.path.exists(done_marker):
            resume = latest_checkpoint(run_dir)
            resumed = resume is not None
            before = _read_seconds(seconds_path) if resumed else 0.0
            self.log(f"{label}: training" + (f" (continuing from {os.path.basename(resume)})" if resume else ""))
            self.stream(
                self.train_command(run_dir, seed, overrides, resume),
                log_path,
                label,
                self.max_epochs(overrides),
                start,
                env,
                seconds_path,
                before,
            )
            with open(done_marker, "w") as f:
                f.write(f"{before + time.time() - start:.1f}\n")
        else:
            resumed = True  # trained by an earlier process
        train_s = float(open(done_marker).read().strip() or "nan")
        self.log(f"{label}: evaluating every modality combination of the test split")
        eval_start = time.time()
        self.stream(self.evaluate_command(run_dir, seed, overrides), log_path, label, None, eval_start, env)
        results = os.path.join(run_dir, "eval", "evaluation.json")
        if not os.path.exists(results):
            raise RuntimeError(f"the evaluation wrote no {results} — full log: {log_path}")
        evaluation = read_json(results, "evaluation")
        times = {"train_seconds": train_s, "train_resumed": resumed, "evaluate_seconds": time.time() - eval_start}
        return times, evaluation

    def stream(
        self,
        cmd: list[str],
        log_path: str,
        label: str,
        max_epochs: int | None,
        started: float,
        env: Mapping[str, str] | None = None,
        seconds_path: str | None = None,
        seconds_before: float = 0.0,
    ) -> None:
        """Run a bundle command, its output to ``log_path``; one progress line per finished epoch, and at each the
        run's training seconds so far (``seconds_before`` plus this process's) written to ``seconds_path``."""
        with open(log_path, "a", buffering=1) as log:  # line by line: a killed runner loses no output
            log.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
            log.flush()
            proc = subprocess.Popen(
                cmd,
                cwd=self.bundle_dir,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                bufsize=1,
                env={**os.environ, **(env or {})},
            )
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
                        seconds = f"{seconds_before + time.time() - started:.1f}\n"
                        atomic_replace(seconds_path, lambda f: f.write(seconds))
            code = proc.wait()
        if code != 0:
            raise RuntimeError(f"bundle command failed (exit {code}): {_cause(log_path)} — full log: {log_path}")

    def check_package(self) -> None:
        """Refuse to start when the bundle's processes would import another ``dmaf_components`` than this runner.

        Each record names the runner's package version and code commit, so both sides must be the same code. They
        can differ silently: ``python -m`` puts the working directory first on ``sys.path``, so a runner started
        with ``python -m dmaf_components.cli`` inside a checkout imports that checkout, while the bundle's processes
        (run in the bundle folder) import what ``PYTHONPATH`` or the installation gives.
        """
        probe = "import os, dmaf_components; print(os.path.realpath(os.path.dirname(dmaf_components.__file__)))"
        out = subprocess.run([self.python, "-c", probe], cwd=self.bundle_dir, capture_output=True, text=True)
        theirs = out.stdout.strip().splitlines()[-1] if out.returncode == 0 and out.stdout.strip() else None
        ours = os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        if theirs != ours:
            raise DMAFRunError(
                "the bundle's processes import dmaf_components from "
                f"{theirs or '(nowhere: ' + out.stderr.strip()[-200:] + ')'}"
                f", this runner from {ours}: records would name the wrong code. Start the runner so that both import "
                "the same package (e.g. `python -P -m dmaf_components.cli`, or from outside the checkout)"
            )


def run_in_slots(
    todo: Sequence[tuple[str, int]], run_one: Callable[..., Any], jobs: int, total: int, log: Callable[[str], None]
) -> list[str]:
    """Run ``run_one(setting, seed, label, env)`` for every run of ``todo``, ``jobs`` at a time, with a study
    time-left estimate; a failed run does not stop the others.

    Each job slot's processes get an equal part of the CPUs (``OMP_NUM_THREADS``, unless set) and, with several
    GPUs, the slots take them in turn (``CUDA_VISIBLE_DEVICES``). ``total``: the study's runs, done ones included
    (for the ``[k/total]`` labels).

    Returns:
        one line per failed run, ``label: error``, in the order they failed.
    """
    done_before = total - len(todo)
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
        label = f"[{done_before + i + 1}/{total}] {setting} seed {seed}"
        with lock:
            slot = slots.pop(0)
            if durations:
                left = sum(durations) / len(durations) * (len(todo) - i) / jobs
                log(f"{label}: starting; study time left ~{_hms(left)}")
        env = dict(threads)
        if gpus > 1:
            env["CUDA_VISIBLE_DEVICES"] = device_ids[slot % gpus]  # the parent's own GPU list, in turn
        start = time.time()
        try:
            record = run_one(setting, seed, label, env)
        except Exception as e:  # noqa: BLE001  (reported below; the other runs go on)
            with lock:
                failures.append(f"{label}: {e}")
            log(f"{label}: FAILED ({type(e).__name__}): {e}")
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
    return failures


def _cause(log_path: str) -> str:
    """The line of a failed bundle command's log that says why, from the last process's output (the log holds every
    process of the run): the project's own data error if there is one, else the last exception line, else the last
    line."""
    try:
        lines = [line.strip() for line in open(log_path, errors="replace").read().splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    starts = [i for i, line in enumerate(lines) if line.startswith("$ ")]  # each process's command line
    lines = lines[starts[-1] + 1 :] if starts else lines  # the failed process is the last one
    errors = [line for line in lines if re.match(r"^[\w.]*(Error|Exception)\b.*?: ", line)]
    own = [line for line in errors if re.search(r"\bDMAF(Data|Config|Checkpoint|Run)?Error\b", line)]
    return (own or errors or lines or ["(no output)"])[-1]


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
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
    )
