"""The `dmaf` command line: help lists the commands, and a mistyped command line runs nothing."""

from __future__ import annotations

import functools
import inspect
import sys

import pytest

from dmaf_components.cli import DMAF, main

COMMANDS = [name for name, _ in inspect.getmembers(DMAF, inspect.isfunction) if not name.startswith("_")]


def _run(argv, capsys) -> tuple[int, str, str]:
    code = 0
    try:
        main(argv)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv", [[], ["-h"], ["--help"]])
def test_help_lists_every_command(argv, capsys):
    code, out, _ = _run(argv, capsys)
    assert code == 0
    for name in ["check", "datalist", "demo", "synthetic", "version"]:
        summary = inspect.getdoc(getattr(DMAF, name)).splitlines()[0]
        assert any(line.split() == [name] + summary.split() for line in out.splitlines()), (name, out)


def test_console_script_reads_sys_argv(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["dmaf", "--help"])
    code, out, _ = _run(None, capsys)
    assert code == 0 and "SYNOPSIS" not in out
    assert all(f"  {name} " in out for name in COMMANDS)


def test_command_help_shows_arguments(capsys):
    code, out, _ = _run(["datalist", "--help"], capsys)
    assert code == 0
    assert "dmaf datalist DATASET DATA_DIR" in out and "--output" in out and "--no_check" in out
    code, out, _ = _run(["check", "-h"], capsys)
    assert code == 0 and "dmaf check DATA_DIR" in out and "--datalist" in out


def test_mistyped_flag_runs_nothing(tmp_path, capsys):
    from dmaf_components.data import synthesize_brats

    data = tmp_path / "data"
    synthesize_brats(str(data), cases=1, shape=(8, 8, 8))
    out_file = tmp_path / "X.json"
    code, out, err = _run(["datalist", "brats", str(data), "--out", str(out_file)], capsys)
    assert code == 2 and out == ""
    assert err.strip() == (
        "dmaf: error: datalist: unknown flag --out; did you mean --output? (see dmaf datalist --help)"
    )
    assert not (data / "datalist.json").exists() and not out_file.exists()
    code, _, err = _run(["synthetic", "brats", str(tmp_path / "syn"), "--case=2"], capsys)
    assert code == 2 and "did you mean --cases?" in err and not (tmp_path / "syn").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["datalst", "brats", "x"], "unknown command 'datalst'; did you mean datalist?"),
        (["--version"], "unknown command '--version'; did you mean version?"),
        (["check"], "check: missing argument DATA_DIR"),
        (["version", "extra"], "version: unexpected argument 'extra'"),
        (["datalist", "brats", "x", "-o", "y"], "flag -o is ambiguous: --output or --overwrite"),
        (["datalist", "brats", "x", "--seed", "1", "--seed=2"], "--seed given twice"),
    ],
)
def test_bad_command_lines_exit_2_with_one_line(argv, message, capsys):
    code, out, err = _run(argv, capsys)
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err, err


def test_flag_spellings_are_accepted(monkeypatch, capsys):
    """--name value, --name=value, hyphens, boolean --flag / --noflag, -x shortcuts, negative numbers, and values
    before or after the flags; `--` (once python-fire's own flags) is refused, never read as a value."""
    calls = []

    def recorder(name):  # the real command's signature and docstring, so that its parser is the real one's
        real = getattr(DMAF, name)

        @functools.wraps(real)
        def record(self, *args, **kwargs):
            bound = inspect.signature(real).bind(self, *args, **kwargs)
            bound.apply_defaults()
            calls.append(dict(bound.arguments))

        return record

    for name in ("synthetic", "datalist"):
        monkeypatch.setattr(DMAF, name, recorder(name))
    main(["synthetic", "brats", "d", "--cases", "2", "--shape=8,8,8", "--seed", "-1", "--overwrite"])
    main(["datalist", "brats", "d", "--missing-rates", "t1=0.2", "--nooverwrite", "--no-check", "-e"])
    main(["datalist", "--data_dir", "d", "brats"])
    code, out, err = _run(["datalist", "--data_dir", "d", "brats", "--", "--trace"], capsys)
    assert code == 2 and out == "" and "datalist: unexpected argument '--'" in err, err
    assert len(calls) == 3  # the values as the commands receive them (the rest at their defaults)
    assert (
        calls[0].items()
        >= {"dataset": "brats", "out_dir": "d", "cases": 2, "shape": (8, 8, 8), "seed": -1, "overwrite": True}.items()
    )
    assert (
        calls[1].items()
        >= {
            "dataset": "brats",
            "data_dir": "d",
            "missing_rates": "t1=0.2",
            "overwrite": False,
            "no_check": True,
            "exact": True,
        }.items()
    )
    assert calls[2].items() >= {"dataset": "brats", "data_dir": "d", "exact": False}.items()


def test_kwargs_command_accepts_any_flag(monkeypatch, capsys):
    """A method with **overrides (e.g. a future `ablation`) needs nothing else to be listed and to take any flag."""
    seen = {}

    def ablation(self, name: str, **overrides) -> None:
        """Run an ablation with bundle overrides."""
        seen.update(name=name, **overrides)

    monkeypatch.setattr(DMAF, "ablation", ablation, raising=False)
    code, out, _ = _run([], capsys)
    listed = [line.split() for line in out.splitlines()]
    assert ["ablation", "Run", "an", "ablation", "with", "bundle", "overrides."] in listed
    main(["ablation", "no_dtm", "--epochs", "5", "--roi-size=[8,8,8]"])
    assert seen == {"name": "no_dtm", "epochs": 5, "roi_size": [8, 8, 8]}
    code, _, err = _run(["ablation"], capsys)
    assert code == 2 and "missing argument NAME" in err


def test_synthetic_study_profile_for_both_datasets_and_bad_workers(tmp_path, capsys):
    code, _, _ = _run(
        [
            "synthetic",
            "brats",
            str(tmp_path / "b"),
            "--cases",
            "2",
            "--shape=16,16,8",
            "--profile",
            "study",
            "--workers",
            "2",
        ],
        capsys,
    )
    assert code == 0 and len(list((tmp_path / "b" / "MICCAI_BraTS2020_TrainingData").iterdir())) == 2
    code, _, err = _run(["synthetic", "myops", str(tmp_path / "m"), "--workers", "0"], capsys)
    assert code != 0 and "--workers: need a whole number of at least 1, got 0" in err
    assert not (tmp_path / "m").exists()  # refused before anything is written
    code, _, err = _run(["synthetic", "myops", str(tmp_path / "m"), "--workers", "two"], capsys)
    assert code != 0 and "--workers: need a whole number of at least 1, got 'two'" in err
