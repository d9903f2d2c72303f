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
"""The ``dmaf`` command line (python-fire)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import fire

from .data.constants import DMAFDataError

__all__ = ["main", "DMAF"]


def _parse_rates(rates) -> dict[str, float] | list[float] | None:
    """``t1=0.2,t2=0.8`` / a dict / a list of rates in canonical order."""
    if rates is None or isinstance(rates, (dict, list, tuple)):
        return rates
    text = str(rates)
    if "=" not in text:
        return [float(v) for v in text.split(",")]
    out = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise DMAFDataError(f"--missing_rates: {item!r} is not NAME=RATE") from None
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


class DMAF:
    """DMAF-Net tools: datalists, synthetic data, and the README demo."""

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
    ) -> str:
        """Write a decathlon-style datalist with a seeded split and persistent IDT modality masks.

        Args:
            dataset: brats, msd, myops or auto.
            data_dir: the dataset folder (paths in the datalist are relative to it).
            output: JSON path (default DATA_DIR/datalist.json); an existing file is kept unless --overwrite.
            split: train,val,test counts or fractions (default 219,50,100 for BraTS; 0.6,0.2,0.2 for MyoPS).
            mode: idt (persistent masks) or pdt (a random combination per iteration).
            missing_rates: e.g. t1=0.2,t1ce=0.4,flair=0.6,t2=0.8 (default: the paper's).
            exact: exact-count IDT masks (each pattern gets round(N * P(pattern)) cases).
            seed: seed of the split and of the masks.
        """
        import os

        from .data import build_datalist, write_datalist

        datalist = build_datalist(
            data_dir, dataset, _sizes(split, "split"), mode, _parse_rates(missing_rates), exact, seed
        )
        path = write_datalist(datalist, output or os.path.join(data_dir, "datalist.json"), overwrite)
        sizes = "/".join(str(len(datalist[k])) for k in ("training", "validation", "testing"))
        print(f"datalist: {path} ({datalist['layout']}, train/val/test = {sizes}, mode {mode})")
        if mode == "idt":
            asked = ", ".join(f"{k} {v:.2f}" for k, v in datalist["missing_rates"].items())
            got = ", ".join(f"{k} {v:.3f}" for k, v in datalist["realised_missing_rates"].items())
            print(f"missing rates asked: {asked}")
            print(f"missing rates realised over {len(datalist['training'])} training cases: {got}")
        return path

    def synthetic(
        self, dataset: str, out_dir: str, cases: int = 12, shape=None, seed: int = 0, overwrite: bool = False
    ) -> str:
        """Write a deterministic synthetic dataset in the exact BraTS2020 or MyoPS2020 layout.

        Args:
            dataset: brats or myops.
            out_dir: output folder; existing cases are kept unless --overwrite.
            cases: number of cases.
            shape: volume size, e.g. 96,96,64 (default 240,240,155 for BraTS, 256,256,5 for MyoPS).
            seed: dataset seed.
        """
        from .data import synthesize_brats, synthesize_myops

        kind = dataset.lower()
        if kind not in ("brats", "myops"):
            raise DMAFDataError(f"dataset: expected brats or myops, got {dataset!r}")
        size = _sizes(shape, "shape")
        kwargs = {} if size is None else {"shape": [int(v) for v in size]}
        make = synthesize_brats if kind == "brats" else synthesize_myops
        make(out_dir, cases=cases, seed=seed, overwrite=overwrite, **kwargs)
        print(f"synthetic {kind}: {cases} cases in {out_dir}")
        return out_dir

    def version(self) -> str:
        """Print the package version."""
        from . import __version__

        return __version__

    def demo(self, data_dir: str = "data/synthetic_brats", work_dir: str = "runs/demo", epochs: int = 12) -> None:
        """Run the end-to-end demo on the embedded synthetic dataset (see README).

        Args:
            data_dir: where the synthetic dataset is (generated when missing).
            work_dir: where weights, logs, tables and the segmentation go.
            epochs: training epochs.
        """
        from .demo import run_demo

        run_demo(data_dir, work_dir, epochs=epochs)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``dmaf`` console script: data errors end in one line on stderr and exit status 2."""
    try:
        fire.Fire(DMAF, command=argv, serialize=lambda _: None)
    except DMAFDataError as exc:
        print(f"dmaf: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
