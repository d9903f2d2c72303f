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
"""The ``dmaf`` command line (argparse).

Each command is a public method of :class:`DMAF`; its parser is built from the method's signature and docstring
(:func:`~dmaf_components.command_parser.command_parser`), and the whole command line is parsed before the method
runs: an unknown command or flag (with the nearest known one), a flag given twice, a missing or extra argument is one
line on stderr and exit status 2, so a typo never runs a command with defaults.
"""

from __future__ import annotations

import inspect
import math
import sys
from collections.abc import Sequence

from .command_parser import UsageError, bind_arguments, command_parser, suggest
from .data.constants import DMAFDataError
from .errors import DMAFError

__all__ = ["main", "DMAF", "UsageError"]


def _rate(value, item) -> float:
    """One missing rate: a finite number in [0, 1) (NaN passes a range test, and an endless redraw followed)."""
    try:
        rate = float(value)
    except (TypeError, ValueError):
        rate = None
    if isinstance(value, bool) or rate is None or not math.isfinite(rate) or not 0.0 <= rate < 1.0:
        raise DMAFDataError(f"--missing_rates: {item!r}: a missing rate must be a number in [0, 1)")
    return rate


def _parse_rates(rates) -> dict[str, float] | list[float] | None:
    """``t1=0.2,t2=0.8`` / a dict / a list of rates in canonical order; each a finite number in [0, 1)."""
    if rates is None:
        return None
    if isinstance(rates, dict):
        return {str(k): _rate(v, f"{k}={v}") for k, v in rates.items()}
    if isinstance(rates, (list, tuple)):
        return [_rate(v, v) for v in rates]
    text = str(rates)
    if "=" not in text:
        return [_rate(v, v) for v in text.split(",")]
    out = {}
    for item in text.split(","):
        name, equals, value = item.partition("=")
        if not equals or not name.strip():
            raise DMAFDataError(f"--missing_rates: {item!r} is not NAME=RATE")
        out[name.strip()] = _rate(value, item)
    return out


def _sizes(value, name: str) -> list[float] | None:
    if value is None:
        return None
    if isinstance(value, (int, float)):
        raise DMAFDataError(f"--{name}: expected comma-separated values, got {value!r}")
    items = value.split(",") if isinstance(value, str) else value
    try:
        return [float(v) for v in items]
    except ValueError:
        raise DMAFDataError(f"--{name}: expected numbers, got {value!r}") from None


def _count(value, name: str) -> int:
    """A whole number >= 1 given on the command line (the command line passes 2 as int, "x" or 2.5 as they are)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DMAFDataError(f"--{name}: need a whole number of at least 1, got {value!r}")
    return value


class DMAF:
    """DMAF-Net tools: datalists, data checks, synthetic data, and the README demo."""

    def datalist(
        self,
        dataset: str,
        data_dir: str,
        output: str | None = None,
        split: Sequence[float] | str | None = None,
        mode: str = "idt",
        missing_rates=None,
        exact: bool = False,
        seed: int = 0,
        overwrite: bool = False,
        no_check: bool = False,
        masks_from: str | None = None,
        test_list: str | None = None,
    ) -> str:
        """Write a decathlon-style datalist with a seeded split and persistent IDT modality masks.

        Every case is read and checked first (as `dmaf check`); when a check fails, the problems are printed and
        nothing is written.

        Args:
            dataset: brats, msd, myops or auto.
            data_dir: the dataset folder (paths in the datalist are relative to it).
            output: JSON path (default DATA_DIR/datalist.json); an existing file is kept unless --overwrite.
            split: train,val,test counts or fractions (default 219,50,100 for BraTS; 0.6,0.2,0.2 for MyoPS).
            mode: idt (persistent masks) or pdt (a random combination per iteration).
            missing_rates: e.g. t1=0.2,t1ce=0.4,flair=0.6,t2=0.8 (default: the paper's).
            exact: exact-count IDT masks (each pattern gets round(N * P(pattern)) cases).
            seed: seed of the split and of the masks.
            overwrite: replace an existing datalist file.
            no_check: write the datalist without reading the cases (--no_check or --no-check).
            masks_from: a PASSION split file (e.g. Brats2020_imb_split_mr2468.csv, MyoPS2020_longtail_split_357.csv):
                its cases are the training split, with its masks; the other cases go to validation and testing.
            test_list: with --masks_from, a file of test case names, one per line (e.g. PASSION's test.txt); the
                remaining cases go to validation (default: --split's last two sizes, seeded).
        """
        import os

        from .data import build_datalist, check_datalist, write_datalist
        from .data.check import untrained_modalities

        for flag, value in (("masks_from", masks_from), ("test_list", test_list)):
            if value is not None and (not isinstance(value, str) or not value):
                raise DMAFDataError(f"--{flag}: expected a file name, got {value!r}")
        datalist = build_datalist(
            data_dir,
            dataset,
            _sizes(split, "split"),
            mode,
            _parse_rates(missing_rates),
            exact,
            seed,
            masks_from=masks_from,
            test_list=test_list,
        )
        output = output or os.path.join(data_dir, "datalist.json")
        if os.path.exists(output) and not overwrite:  # said before every case is read
            raise DMAFDataError(f"{output}: exists already; pass --overwrite to replace it")
        if not no_check:
            report = check_datalist(datalist, data_dir, name=output)
            _report(report, f"{output} not written; fix the data or pass --no_check")
        path = write_datalist(datalist, output, overwrite)
        sizes = "/".join(str(len(datalist[k])) for k in ("training", "validation", "testing"))
        print(f"datalist: {path} ({datalist['layout']}, train/val/test = {sizes}, mode {mode})")
        if mode == "idt":
            got = ", ".join(f"{k} {v:.3f}" for k, v in datalist["realised_missing_rates"].items())
            if masks_from is not None:
                tests = f", test cases from {test_list}" if test_list is not None else ""
                print(f"training cases and masks from {masks_from}{tests}")
            else:
                asked = ", ".join(f"{k} {v:.2f}" for k, v in datalist["missing_rates"].items())
                print(f"missing rates asked: {asked}")
            print(f"missing rates realised over {len(datalist['training'])} training cases: {got}")
        if no_check:  # otherwise the data check printed them
            for warning in untrained_modalities(datalist):
                print(f"warning: training: {path}: {warning}")
        return path

    def check(self, data_dir: str, datalist: str | None = None, workers: int | None = None, labels=None) -> None:
        """Read every case of a datalist once and report every problem, one line each (exit status 1 on errors).

        Checks: unreadable, truncated or non-NIfTI files; 2-D files; NaN or inf voxels; modalities and label of a
        case on different grids (shape, affine); label values outside the dataset's set; all-zero modalities (a
        warning: treated as missing). The datalist itself: entries or fields of the wrong type, a modality_mask of
        the wrong length or without a modality, a case listed twice (in one section or two), relative paths leaving
        DATA_DIR, and (a warning) a modality that no training case has.

        Args:
            data_dir: the dataset folder.
            datalist: the datalist to check (default DATA_DIR/datalist.json); all its sections are checked.
            workers: parallel readers (default min(4, CPU count)).
            labels: allowed label values, e.g. 0,1,2,4 (default: BraTS 0,1,2,4; MyoPS 0,200,500,600,1220,2221).
        """
        import os

        from .data import check_datalist

        if not os.path.isdir(data_dir):
            raise DMAFDataError(f"{data_dir}: no such directory")
        datalist = datalist or os.path.join(data_dir, "datalist.json")
        report = check_datalist(datalist, data_dir, _sizes(labels, "labels"), workers)  # paths relative to DATA_DIR
        _report(report, f"{datalist}: the data check failed")

    def synthetic(
        self,
        dataset: str,
        out_dir: str,
        cases: int = 12,
        shape=None,
        seed: int = 0,
        overwrite: bool = False,
        profile: str = "demo",
        workers: int = 1,
        spacing: float | None = None,
        template_dir: str | None = None,
    ) -> str:
        """Write a deterministic synthetic dataset in the exact BraTS2020 or MyoPS2020 layout.

        Args:
            dataset: brats or myops.
            out_dir: output folder; existing cases are kept unless --overwrite.
            cases: number of cases.
            shape: volume size, e.g. 96,96,64 (default 240,240,155 for BraTS, 256,256,5 for MyoPS).
            seed: dataset seed.
            profile: demo, or study (the ablation studies' harder data, docs/accuracy.md); BraTS also anatomy
                (brains on the MNI ICBM152 template with contrast from the sequences' signal equations; needs
                `pip install nilearn` for the template, or --template_dir).
            workers: cases written in parallel processes (the same files as one).
            spacing: voxel size in mm of the anatomy profile, default 2 (its grid comes from the template; --shape is
                refused).
            template_dir: folder with the mni_icbm152_*_tal_nlin_sym_09a_converted.nii.gz files (anatomy profile;
                default: the installed nilearn's).
        """
        from .data import synthesize_brats, synthesize_myops

        kind = dataset.lower()
        if kind not in ("brats", "myops"):
            raise DMAFDataError(f"dataset: expected brats or myops, got {dataset!r}")
        size = _sizes(shape, "shape")
        kwargs = {} if size is None else {"shape": [int(v) for v in size]}
        cases = _count(cases, "cases")
        workers = _count(workers, "workers")
        make = synthesize_brats if kind == "brats" else synthesize_myops
        if profile != "anatomy" and (spacing is not None or template_dir is not None):
            raise DMAFDataError("--spacing/--template_dir: only for --profile anatomy (BraTS)")
        if profile == "anatomy" and kind == "brats":
            spacing = 2.0 if spacing is None else spacing
            if size is not None:
                raise DMAFDataError("--shape: the anatomy profile's grid comes from the template; set --spacing")
            if isinstance(spacing, bool) or not isinstance(spacing, (int, float)) or not 0 < spacing <= 8:
                raise DMAFDataError(f"--spacing: expected a voxel size in mm in (0, 8], got {spacing!r}")
            kwargs.update(spacing=float(spacing), template_dir=None if template_dir is None else str(template_dir))
        make(str(out_dir), cases=cases, seed=seed, overwrite=overwrite, profile=profile, workers=workers, **kwargs)
        print(f"synthetic {kind}: {cases} cases in {out_dir}")
        return out_dir

    def ablation(
        self,
        dataset: str,
        data_dir: str,
        out: str,
        settings: str = "table3",
        seeds: int = 3,
        datalist: str | None = None,
        summarize_only: bool = False,
        jobs: int = 1,
        reference: str | None = None,
        **overrides,
    ) -> None:
        """Run the paper's Table-3 ablation through the bundle (resumable) and write table3.{csv,md,png}.

        Args:
            dataset: brats, msd (3-D) or myops (2-D).
            data_dir: the dataset folder.
            out: the study folder (one folder per run, the summary files).
            settings: table3 (all eight rows) or names, e.g. baseline,full (baseline, dmaf, distill, dtm,
                dmaf+distill, dmaf+dtm, distill+dtm, full); the baseline is always run, unless --reference is given.
            seeds: number of seeds per setting (0 .. seeds-1), or distinct seeds, e.g. [0,2].
            datalist: datalist file (default DATA_DIR/datalist.json).
            summarize_only: rebuild the summary from the finished runs without training anything.
            jobs: runs trained at the same time (a GPU that small patches leave idle; several GPUs in turn).
            reference: a finished study folder on the same datalist: differences are then taken against its same
                setting and seeds (a variant, e.g. --reference studies/ref --settings full --learn_alpha1 False),
                and the baseline is run only when named.
            overrides: bundle overrides for every run, e.g. --epochs 50 --batch_size 8 --roi_size [96,96].
        """
        from .ablation import AblationStudy

        study = AblationStudy(
            dataset, data_dir, out, settings, seeds, datalist, overrides, jobs=_count(jobs, "jobs"), reference=reference
        )
        if summarize_only:
            study.summarize()
        else:
            study.run()

    def version(self) -> str:
        """Print the package version."""
        from . import __version__

        print(__version__)  # main() prints no return value
        return __version__

    def demo(self, data_dir: str = "data/demo_brats", work_dir: str = "runs/demo", epochs: int | None = None) -> None:
        """Run the end-to-end demo on the embedded synthetic dataset (see README).

        Args:
            data_dir: where the synthetic dataset is (generated when missing).
            work_dir: where weights, logs, tables and the segmentation go.
            epochs: training epochs (default the demo's budget, ``DEMO_EPOCHS``).
        """
        from .demo import DEMO_EPOCHS, run_demo

        run_demo(data_dir, work_dir, epochs=DEMO_EPOCHS if epochs is None else epochs)


def _report(report, failure: str) -> None:
    """Print a data-check report (one line per problem, then a summary); raise when it has errors."""
    from .data import DataCheckError

    for problem in report.problems:
        print(problem)
    print(report.summary())
    if report.errors:
        raise DataCheckError(f"{failure}: {len(report.errors)} error(s), listed above")


def _commands() -> dict[str, str]:
    """Public methods of :class:`DMAF` -> the first line of their docstring."""
    return {
        name: (inspect.getdoc(fn) or "").splitlines()[0]
        for name, fn in inspect.getmembers(DMAF, inspect.isfunction)
        if not name.startswith("_")
    }


def _usage() -> str:
    commands = _commands()
    width = max(map(len, commands))
    lines = ["usage: dmaf COMMAND [ARGS] [--FLAG VALUE ...]", "", inspect.getdoc(DMAF), "", "commands:"]
    lines += [f"  {name:<{width}}  {doc}" for name, doc in commands.items()]
    lines += ["", "`dmaf COMMAND --help` shows the arguments of a command."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``dmaf`` console script.

    ``dmaf``, ``dmaf -h`` and ``dmaf --help`` list the commands; ``dmaf COMMAND --help`` shows a command's arguments.
    A command line that does not fit the command (an unknown flag, with the nearest known one; a flag given twice; a
    missing or extra argument) exits with status 2 before anything is read or written, as do data errors (one line
    on stderr); a data check that finds errors exits with status 1.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if not args or args[0] in ("-h", "--help", "help"):
            print(_usage())
            return
        command, rest = args[0], args[1:]
        commands = _commands()
        if command not in commands:
            hint = suggest(command.lstrip("-"), commands)
            raise UsageError(f"unknown command {command!r}{hint} (dmaf --help lists the commands)")
        if "-h" in rest or "--help" in rest:
            print(command_parser(getattr(DMAF, command), command, rest)[0].format_help())
            return
        getattr(DMAF(), command)(**bind_arguments(getattr(DMAF, command), command, rest))
    except DMAFError as exc:
        print(f"dmaf: error: {exc}", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", 2))


if __name__ == "__main__":
    main()
