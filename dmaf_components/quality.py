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
"""How far to trust an inference: the quality table that travels with the weights, and the per-study report.

- :func:`quality_table` / :func:`write_quality_table`: the evaluation (``configs/evaluate.json``, through
  :class:`~dmaf_components.evaluation.CombinationTables`) writes ``quality.json`` beside the evaluated weights: per
  modality combination and region, Dice and HD95 mean, standard deviation over cases and case count, with the
  provenance (dataset, datalist and its SHA-256, the model file's SHA-256, variant, cases, format version);
- :func:`load_quality_table`: inference reads it and refuses, in one line, a table of another model (its SHA-256
  differs from the checkpoint's);
- :func:`study_report`: ``<study>_report.json`` beside the label map: the modalities found and used, the accuracy
  expected for the present combination, the expected Dice gain of acquiring each missing modality, flags, and the
  uncertainty's summary;
- :class:`StudyReportd`: the same report as a postprocessing step, put in the sample under ``result``: the JSON that
  MONAI Label's infer response carries.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from .checkpoints import read_state_dict, weights_sha256
from .data.constants import DMAFDataError
from .errors import as_bool
from .outputs import atomic_write
from .transforms import AVAILABLE_POSTFIX
from .uncertainty import UNCERTAINTY_SUMMARY_KEY

__all__ = [
    "QUALITY_FORMAT_VERSION",
    "REPORT_FORMAT_VERSION",
    "REPORT_POSTFIX",
    "LOW_DICE",
    "file_sha256",
    "write_json_atomic",
    "quality_table",
    "write_quality_table",
    "load_quality_table",
    "report_outputs",
    "study_report",
    "report_line",
    "REPORT_CONTEXT_KEY",
    "StudyReportd",
]

logger = logging.getLogger(__name__)

#: version of the ``quality.json`` layout (raised when a key changes meaning)
QUALITY_FORMAT_VERSION = 1
#: version of the ``<study>_report.json`` layout
REPORT_FORMAT_VERSION = 1
#: key of what only the inference run knows about a study, as a JSON text: ``{"not_used": {modality: why},
#: "never_trained": [modality], "segmentation": file name}`` (:class:`StudyReportd` reads it)
REPORT_CONTEXT_KEY = "report_context"
#: postfix of the per-study report: ``<study>_report.json``
REPORT_POSTFIX = "report"
#: expected Dice (in %) below which a region is flagged in the report
LOW_DICE = 50.0


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of the file ``path``.

    Raises:
        DMAFDataError: the file cannot be read (one line naming it).
    """
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(chunk), b""):
                digest.update(block)
    except OSError as exc:
        raise DMAFDataError(f"{path}: cannot be read for its SHA-256 ({exc.strerror or exc})") from None
    return digest.hexdigest()


def write_json_atomic(obj: Any, target: str, overwrite: bool = True) -> str:
    """Write ``obj`` as JSON to ``target`` atomically (:func:`~dmaf_components.outputs.atomic_write`).

    Raises:
        DMAFDataError: ``target`` exists and ``overwrite`` is off, or it cannot be written (one line).
    """

    def write(f: Any) -> None:
        json.dump(obj, f, indent=2, allow_nan=False)
        f.write("\n")

    return atomic_write(target, write, overwrite=overwrite, what="the file")


def _stats(values: Sequence[float]) -> dict[str, float | int | None]:
    """Mean, sample standard deviation (ddof 1; None below 2 values) and count of the finite ``values``."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    return {
        "mean": float(v.mean()) if v.size else None,
        "sd": float(v.std(ddof=1)) if v.size > 1 else None,
        "n": int(v.size),
    }


def quality_table(
    result: Mapping[str, Any],
    dataset: str,
    model_path: str,
    datalist: Any = None,
    variant: str = "raw",
) -> dict[str, Any]:
    """The quality table of an evaluation result (:func:`~dmaf_components.evaluation.summarize`).

    Args:
        result: ``summarize``'s output (``cases``, ``modalities``, ``regions``, ``per_case``).
        dataset: the dataset name (``brats``, ``myops``).
        model_path: the evaluated weights; the file's SHA-256 and the weights' own
            (:func:`~dmaf_components.checkpoints.weights_sha256`) bind the table to them.
        datalist: the datalist's path (its SHA-256 is recorded), or None / a non-path (recorded as null).
        variant: the ``per_case`` variant tabulated (``raw``: no post-processing, the labels inference writes).

    Returns:
        ``{"format_version", "dataset", "datalist": {"path", "sha256"}, "model": {"path", "sha256",
        "weights_sha256"}, "variant",
        "cases", "modalities", "regions", "combinations": {name: {region: {"dice": {"mean", "sd", "n"},
        "hd95": {...}}}}}``: Dice in %, HD95 in the label's units under the evaluation's empty-region rule; ``sd`` is
        the sample standard deviation over cases (None with fewer than 2), ``n`` the cases with a defined value.

    Raises:
        DMAFDataError: ``variant`` was not evaluated, or the model file cannot be read.
    """
    per_case = result.get("per_case", {})
    if variant not in per_case:
        raise DMAFDataError(f"quality table: variant {variant!r} not evaluated (evaluated: {', '.join(per_case)})")
    regions = list(result["regions"])
    combinations = {}
    for name, values in per_case[variant].items():
        dice = np.asarray(values["dice"], dtype=np.float64).reshape(-1, len(regions))
        hd95 = np.asarray(values["hd95"], dtype=np.float64).reshape(-1, len(regions))
        combinations[name] = {
            region: {"dice": _stats(dice[:, r]), "hd95": _stats(hd95[:, r])} for r, region in enumerate(regions)
        }
    is_path = isinstance(datalist, (str, os.PathLike)) and os.path.isfile(datalist)
    return {
        "format_version": QUALITY_FORMAT_VERSION,
        "dataset": str(dataset),
        "datalist": {
            "path": os.path.abspath(datalist) if is_path else None,
            "sha256": file_sha256(datalist) if is_path else None,
        },
        "model": {
            "path": os.path.abspath(model_path),
            "sha256": file_sha256(model_path),
            "weights_sha256": weights_sha256(read_state_dict(model_path, "cpu")),
        },
        "variant": variant,
        "cases": int(result["cases"]),
        "modalities": list(result["modalities"]),
        "regions": regions,
        "combinations": combinations,
    }


def write_quality_table(
    result: Mapping[str, Any],
    target: str,
    dataset: str,
    model_path: str | None,
    datalist: Any = None,
    variant: str = "raw",
) -> str | None:
    """Write :func:`quality_table` to ``target`` atomically (replacing an earlier table); the caller is rank 0.

    Without a model file (``model_path`` None or absent, e.g. a network given in Python) no table is written: a
    table not bound to weights would be trusted for any model. One warning line says so.

    Returns:
        ``target``, or None when nothing was written.
    """
    if model_path is None or not os.path.isfile(model_path):
        logger.warning(f"{target}: quality table not written (no model file {model_path} to bind it to)")
        return None
    write_json_atomic(quality_table(result, dataset, model_path, datalist, variant), target)
    logger.info(f"quality table ({variant}, {result['cases']} cases) -> {target}")
    return target


def load_quality_table(
    path: str | None, checkpoint: str | None, modalities: Sequence[str] | None = None, note: bool = True
) -> dict | None:
    """The quality table at ``path`` if it belongs to ``checkpoint``; None (and, with ``note``, one note in the log)
    when absent.

    A ``checkpoint`` that is not a file gives None without a note: loading it reports its own error.

    Raises:
        DMAFDataError: one line naming the table: unreadable, not a quality table, another format version, the
            table of another model (neither the file's SHA-256 nor the weights' own matches the checkpoint's), or of
            other ``modalities``.
    """
    if checkpoint is not None and not os.path.isfile(checkpoint):
        return None
    if path is None or not os.path.isfile(path) or checkpoint is None:
        why = "no checkpoint to match it to" if path is not None and os.path.isfile(path) else "no quality table"
        if note:
            logger.info(f"note: {path}: {why}; reports say expected null (evaluate.json writes the table)")
        return None
    try:
        with open(path) as f:
            table = json.load(f)
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
        raise DMAFDataError(f"{path}: quality table cannot be read ({reason})") from None
    if not isinstance(table, dict) or not isinstance(table.get("combinations"), dict):
        raise DMAFDataError(f"{path}: not a quality table (no 'combinations'; evaluate.json writes it)")
    if table.get("format_version") != QUALITY_FORMAT_VERSION:
        raise DMAFDataError(
            f"{path}: quality table format_version {table.get('format_version')!r}, this bundle "
            f"reads {QUALITY_FORMAT_VERSION}; re-run evaluate.json"
        )
    expected = (table.get("model") or {}).get("sha256")
    actual = file_sha256(checkpoint)
    weights = (table.get("model") or {}).get("weights_sha256")
    if expected != actual and weights is not None and weights_sha256(read_state_dict(checkpoint, "cpu")) == weights:
        actual = expected  # the same weights in another file: the TorchScript export of the evaluated model.pt
    if expected != actual:
        raise DMAFDataError(
            f"{path}: quality table of another model (sha256 {str(expected)[:12]}, {checkpoint} has {actual[:12]}); "
            "re-run evaluate.json for these weights, or pass --save_report false"
        )
    if modalities is not None and list(table.get("modalities", [])) != list(modalities):
        raise DMAFDataError(
            f"{path}: quality table for modalities {table.get('modalities')}, inference uses {list(modalities)}"
        )
    return table


def report_outputs() -> tuple[tuple[str, str], ...]:
    """``(postfix, ext)`` of the per-study report, for :func:`~dmaf_components.inference.plan_outputs`."""
    return ((REPORT_POSTFIX, ".json"),)


def _name(present: Sequence[str], modalities: Sequence[str]) -> str:
    return "+".join(m for m in modalities if m in present)


def _dice(table: Mapping, combination: str, region: str) -> float | None:
    return table["combinations"].get(combination, {}).get(region, {}).get("dice", {}).get("mean")


def study_report(
    case: str,
    modalities: Sequence[str],
    found: Sequence[str],
    used: Sequence[str],
    table: Mapping[str, Any] | None,
    not_used: Mapping[str, str] | None = None,
    never_trained: Sequence[str] = (),
    segmentation: str | None = None,
    table_path: str | None = None,
    uncertainty: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The report of one segmented study (``<study>_report.json``).

    Args:
        case: the study.
        modalities: the model's modalities, in channel order.
        found: the modalities the study has files for; ``used``: those the network used (after all-zero and
            never-trained modalities were dropped); ``not_used``: ``{modality: why}`` for found but not used.
        table: :func:`load_quality_table`'s table, or None (then ``expected`` and ``advice`` are null).
        never_trained: modalities the checkpoint never saw in training: acquiring them would not be used, so they
            get no advice.
        segmentation, table_path: recorded paths.
        uncertainty: the study's uncertainty summary
            (:func:`~dmaf_components.uncertainty.uncertainty_summary`, with the map's file name), or None when the
            uncertainty was not computed.

    Returns:
        ``{"format_version", "case", "segmentation", "modalities_found", "modalities_used", "not_used",
        "quality_table", "expected": {"combination", "variant", "regions": {region: {"dice_mean", "dice_sd",
        "cases", "hd95_mean", "hd95_sd"}}} or None, "advice": [{"modality", "combination", "dice_gain":
        {region: gain}, "mean_gain"}] (largest mean gain first) or None, "flags": [text], "uncertainty": the summary
        or None}``.
    """
    found = [m for m in modalities if m in found]
    used = [m for m in modalities if m in used]
    report: dict[str, Any] = {
        "format_version": REPORT_FORMAT_VERSION,
        "case": case,
        "segmentation": segmentation,
        "modalities_found": found,
        "modalities_used": used,
        "not_used": dict(not_used or {}),
        "quality_table": table_path if table is not None else None,
        "expected": None,
        "advice": None,
        "flags": [],
        "uncertainty": dict(uncertainty) if uncertainty is not None else None,
    }
    present = _name(used, modalities)
    if table is None or present not in table["combinations"]:
        return report
    regions = list(table["regions"])
    row = table["combinations"][present]
    report["expected"] = {
        "combination": present,
        "variant": table.get("variant"),
        "regions": {
            r: {
                "dice_mean": row[r]["dice"]["mean"],
                "dice_sd": row[r]["dice"]["sd"],
                "cases": row[r]["dice"]["n"],
                "hd95_mean": row[r]["hd95"]["mean"],
                "hd95_sd": row[r]["hd95"]["sd"],
            }
            for r in regions
        },
    }
    advice = []
    for m in modalities:
        if m in used or m in never_trained:
            continue
        name = _name(used + [m], modalities)
        gain = {}
        for r in regions:
            with_m, now = _dice(table, name, r), _dice(table, present, r)
            gain[r] = None if with_m is None or now is None else with_m - now
        known = [g for g in gain.values() if g is not None]
        advice.append(
            {
                "modality": m,
                "combination": name,
                "dice_gain": gain,
                "mean_gain": float(np.mean(known)) if known else None,
            }
        )
    advice.sort(key=lambda a: -math.inf if a["mean_gain"] is None else a["mean_gain"], reverse=True)
    report["advice"] = advice
    for r in regions:
        mean = row[r]["dice"]["mean"]
        if mean is not None and mean < LOW_DICE:
            report["flags"].append(f"expected {r} Dice below {LOW_DICE:g} with these sequences ({mean:.1f})")
    return report


def report_line(report: Mapping[str, Any], target: str) -> str:
    """The log line of one study's report."""
    head = f"study {report['case']} report"
    expected = report["expected"]
    if expected is None:
        return f"{head}: expected accuracy unknown (no quality table for this model) -> {target}"
    dice = ", ".join(
        f"{r} {v['dice_mean']:.1f}" if v["dice_mean"] is not None else f"{r} n/a"
        for r, v in expected["regions"].items()
    )
    cases = max((v["cases"] for v in expected["regions"].values()), default=0)
    text = f"{head}: expected Dice {dice} ({expected['combination']}, {cases} cases)"
    best = next((a for a in report["advice"] or [] if a["mean_gain"] is not None), None)
    if best is not None:
        text += f"; acquiring {best['modality']} would change mean Dice by {best['mean_gain']:+.1f}"
    if report["flags"]:
        text += f"; {len(report['flags'])} flag(s): {'; '.join(report['flags'])}"
    return f"{text} -> {target}"


class StudyReportd(MapTransform):
    """:func:`study_report` as the last postprocessing step: the report goes into the sample under ``report_key``.

    It is the one place a report is computed. MONAI Label answers an infer request with the label map and the JSON
    its writer finds under the sample's ``result`` key, so with the default key the report reaches MONAI Label's
    clients; the bundle's own inference (:class:`~dmaf_components.inference.StudyEvaluator`) writes the same report
    as ``<study>_report.json``. The step reads only the sample:

    - found: the modalities of ``data["modalities_found"]`` (a study folder's files), or every channel of a 4-D
      image; used: ``data[mask_key]``; found but not used: "all zero";
    - the uncertainty summary of :class:`~dmaf_components.uncertainty.SaveUncertaintyd`, when it ran;
    - ``data[REPORT_CONTEXT_KEY]`` (:data:`REPORT_CONTEXT_KEY`), when the bundle's inference set it: the
      modalities it dropped as never seen in training, and the label map's file name.

    Args:
        keys: the prediction key (a sample without it passes unchanged).
        modalities: the model's modalities in channel order.
        quality_table: path of ``quality.json`` (:func:`load_quality_table`: read once, at the first sample; a
            table of another model raises one line).
        checkpoint: the weights the table must belong to.
        enabled: ``auto`` (a report when a matching table was found or the uncertainty ran), True (always), False.
        report_key: where the report goes (MONAI Label: ``result``; an existing dict there is updated).
        mask_key: the bool ``(M,)`` modality mask of the sample.
        name_key: the study's name (default: the image file's name).
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        modalities: Sequence[str] = (),
        quality_table: str | None = None,
        checkpoint: str | None = None,
        enabled: Any = "auto",
        report_key: str = "result",
        mask_key: str = "modality_mask",
        name_key: str = "case",
        allow_missing_keys: bool = True,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.modalities = [str(m) for m in modalities]
        self.quality_table, self.checkpoint = quality_table, checkpoint
        self.auto = isinstance(enabled, str) and enabled.strip().lower() == "auto"
        self.enabled = True if self.auto else as_bool(enabled, "save_report")
        self.report_key, self.mask_key, self.name_key = report_key, mask_key, name_key
        self._table: dict | None = None
        self._loaded = False

    def use_table(self, table: dict | None) -> None:
        """Use ``table``, already loaded and checked (:func:`load_quality_table`) by the inference run, instead of
        reading ``quality_table`` again at the first sample."""
        self._table, self._loaded = table, True

    def _name(self, d: Mapping[str, Any], key: Any) -> str:
        if self.name_key in d:
            return str(d[self.name_key])
        meta = getattr(d[key], "meta", None) or d.get(f"{key}_meta_dict") or {}
        source = str(meta.get("filename_or_obj", "study"))
        base = os.path.basename(source)
        for ext in (".nii.gz", ".nii", ".nrrd", ".mha"):
            if base.endswith(ext):
                return base[: -len(ext)]
        return base or "study"

    def __call__(self, data: Mapping[Any, Any]) -> dict[Any, Any]:
        d = dict(data)
        if not self.enabled:
            return d
        if not self._loaded:
            # no note: the bundle's inference run has logged it already (a server: see docs/monailabel.md)
            self._table = load_quality_table(self.quality_table, self.checkpoint, self.modalities or None, note=False)
            self._loaded = True
        uncertainty = d.get(UNCERTAINTY_SUMMARY_KEY)
        for key in self.key_iterator(d):
            if self.auto and self._table is None and uncertainty is None:
                continue
            found_files = d.get("modalities_found")
            if isinstance(found_files, str) and found_files != "4-D":
                found = [m for m in found_files.split(",") if m]
            else:
                found = list(self.modalities)
            used = found
            if self.mask_key in d:
                flags = torch.as_tensor(d[self.mask_key]).reshape(-1).bool().tolist()
                used = [m for m, f in zip(self.modalities, flags) if f]
            available = d.get(f"image{AVAILABLE_POSTFIX}")
            zero = []
            if available is not None:
                avail = torch.as_tensor(available).reshape(-1).bool().tolist()
                zero = [m for m, f in zip(self.modalities, avail) if m in found and not f]
            context = d.get(REPORT_CONTEXT_KEY)
            context = json.loads(context) if isinstance(context, str) else {}
            not_used = {m: "all zero" if m in zero else "not used" for m in found if m not in used}
            not_used.update(context.get("not_used", {}))
            report = study_report(
                self._name(d, key),
                self.modalities,
                found,
                used,
                self._table,
                not_used,
                context.get("never_trained", ()),
                context.get("segmentation"),
                table_path=self.quality_table,
                uncertainty=uncertainty if isinstance(uncertainty, Mapping) else None,
            )
            existing = d.get(self.report_key)
            d[self.report_key] = {**existing, **report} if isinstance(existing, Mapping) else report
        return d
