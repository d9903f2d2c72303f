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
"""Batch inference that never gives a silent wrong result and never loses an output (``configs/inference.json``).

- :func:`discover_studies`, :func:`plan_outputs`, :func:`prepare_output_dir`: before any study is computed, the
  studies are listed (every unused file reported), output names checked for collisions and for existing results
  (kept unless ``overwrite``), the checkpoint loaded, and the output folder created and test-written;
- :class:`StudyDataset` and :class:`StudyEvaluator`: a study that cannot be read or segmented becomes one line
  naming the study, the file and the cause; every other study is segmented;
- :class:`AtomicSaveImaged`: each segmentation is written to a temporary file in the output folder and renamed
  (``os.replace``), so that a killed run never leaves a truncated result under the final name;
- :func:`run_inference`: the bundle's ``run``; it ends with a summary and raises :class:`BundleExit` (exit status
  1, the cause as the last line, no traceback) when any study failed or nothing could start.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.data import Dataset
from monai.engines import SupervisedEvaluator
from monai.transforms import Compose
from monai.utils import CommonKeys

from .checkpoints import is_torchscript, load_model_weights
from .errors import DMAFError, BundleExit, as_bool, describe_failure, exit_on_data_error
from .outputs import (
    OUTPUT_EXTENSIONS,
    AtomicSaveImaged,
    _dotted,
    output_extension,
    output_path,
    plan_outputs,
    prepare_output_dir,
)
from .data.constants import DMAFDataError
from .data.studies import STUDY_ERROR_KEY, STUDY_NOTES_KEY, find_studies
from .transforms import AVAILABLE_POSTFIX

__all__ = [
    "BundleExit",
    "FAILURE_KEY",
    "FOUND_KEY",
    "as_bool",
    "describe_failure",
    "exit_on_data_error",
    "discover_studies",
    "OUTPUT_EXTENSIONS",
    "output_extension",
    "output_path",
    "plan_outputs",
    "prepare_output_dir",
    "StudyDataset",
    "StudyEvaluator",
    "AtomicSaveImaged",
    "untrained_modalities",
    "run_inference",
]

logger = logging.getLogger(__name__)

#: key of a sample that could not be prepared: one line naming the file and the cause
FAILURE_KEY = "inference_failure"
#: key holding the modalities a study has files for (comma-separated; ``4-D`` files list their non-zero channels)
FOUND_KEY = "modalities_found"


def discover_studies(
    dataset_dir: str,
    modalities: Sequence[str],
    output_dir: str | None = None,
    modality_map: Mapping[str, str] | None = None,
) -> list[dict]:
    """:func:`~dmaf_components.data.find_studies` for a bundle run: the output folder, when it lies inside
    ``dataset_dir``, is not a study; a missing or empty input folder, or a ``modality_map`` naming an unknown
    modality, ends the run (:class:`BundleExit`)."""
    try:
        studies = find_studies(dataset_dir, modalities, modality_map=modality_map)
    except DMAFError as exc:
        raise BundleExit(str(exc)) from None
    if output_dir is not None:  # an earlier run's output folder inside dataset_dir: results, not a study
        out = os.path.realpath(output_dir)
        studies = [
            s
            for s in studies
            if not (s["image"] == {} and os.path.realpath(os.path.join(dataset_dir, s["case"])) == out)
        ]
        if not studies:
            raise BundleExit(f"{dataset_dir}: no study found besides the output folder {output_dir}")
    return studies


class StudyDataset(Dataset):
    """A MONAI ``Dataset`` of studies (:func:`~dmaf_components.data.find_studies` entries) that never raises.

    A study whose entry carries an ``"error"`` (unusable folder), or whose ``transform`` fails (unreadable file, NaN
    voxels, shapes that differ...), becomes ``{"case": ..., FAILURE_KEY: one line}`` for :class:`StudyEvaluator` to
    report. Good samples get ``FOUND_KEY``: the modalities the study has files for.
    """

    def _transform(self, index: int) -> Any:
        entry = self.data[index]
        case = entry.get("case", str(index))
        if entry.get(STUDY_ERROR_KEY):
            return {"case": case, FAILURE_KEY: str(entry[STUDY_ERROR_KEY])}
        item = {k: v for k, v in entry.items() if k not in (STUDY_ERROR_KEY, STUDY_NOTES_KEY)}
        found = ",".join(item["image"]) if isinstance(item.get("image"), dict) else "4-D"
        try:
            out = self.transform(item) if self.transform is not None else item
        except Exception as exc:  # any failure of one study is reported, the others go on
            return {"case": case, FAILURE_KEY: describe_failure(exc)}
        if isinstance(out, dict):
            out[FOUND_KEY] = found
        return out


def untrained_modalities(checkpoint: str, modalities: Sequence[str]) -> list[str] | None:
    """The modalities that a training checkpoint records as never seen in training, in ``modalities`` order.

    The bundle's training checkpoints (``models/checkpoint_*.pt``) hold the state of the
    :class:`~dmaf_components.handlers.DynamicTrainingMonitor` under ``"dtm"``, whose ``seen`` flags which modalities
    were present in at least one training iteration (a modality missing from every training case, e.g. with
    ``--missing_rates t2=1``, has an untrained encoder). A plain state dict (``models/model.pt``) carries no such
    record, nor does a TorchScript export (``models/model.ts``).

    Returns:
        the never-seen modalities (empty when all were seen), or None when ``checkpoint`` carries no DTM state for
        ``len(modalities)`` modalities (plain state dict, older checkpoint, unreadable file).
    """
    if is_torchscript(checkpoint):  # an export carries the weights only
        return None
    obj = None
    for mmap in (True, False):  # mmap: the weights are not read (only the zip format supports it)
        try:
            obj = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=mmap)
            break
        except Exception:
            continue
    dtm = obj.get("dtm") if isinstance(obj, Mapping) else None
    seen = dtm.get("seen") if isinstance(dtm, Mapping) else None
    if not isinstance(seen, torch.Tensor) or seen.numel() != len(modalities):
        return None
    return [m for m, s in zip(modalities, seen.reshape(-1).bool().tolist()) if not s]


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, (list, tuple)) and value else value


class StudyEvaluator(SupervisedEvaluator):
    """``SupervisedEvaluator`` that segments every good study and records the others.

    A batch (one study) flagged by :class:`StudyDataset`, or whose inference or postprocessing (writing included)
    raises, is logged as one line ``study <case> FAILED: <file>: <cause>`` and recorded in :attr:`failed`; the run
    goes on. Each segmented study is logged with the modalities it has files for and the ones the network used.

    Modalities never seen in training (:attr:`untrained`, set by :func:`run_inference` from a training checkpoint's
    DTM state, :func:`untrained_modalities`): a study that has only such modalities fails (its result would come
    from untrained encoders); beside trained ones, such a modality is not used (its channel is dropped from the
    ``modality_mask``, the condition the network was trained in for it), with one warning line per study.

    With :attr:`save_report` (set by :func:`run_inference`) each segmented study also gets ``<case>_report.json``,
    the report that the postprocessing's :class:`~dmaf_components.quality.StudyReportd` put in the sample (this
    evaluator gives it, under :data:`~dmaf_components.quality.REPORT_CONTEXT_KEY`, the modalities dropped as never
    trained and the label map's name), and one log line; a report that cannot be written fails the study.

    Args:
        modalities: canonical channel order, for the log lines.
        output_dir, output_postfix, output_ext, separate_folder: where results go (:func:`output_path`), for the log
            lines.
        run_options: the other arguments of :func:`run_inference` (``studies``, ``checkpoint``, ...; the bundle's
            ``inference_run``). With them, :meth:`run` is the whole inference run, checks and summary included, so
            that the bundle's ``run`` is ``$@evaluator.run()`` as in the model zoo's bundles; without, it is Ignite's.
        args, kwargs: ``SupervisedEvaluator``'s.
    """

    def __init__(
        self,
        *args: Any,
        modalities: Sequence[str] | None = None,
        output_dir: str | None = None,
        output_postfix: str = "seg",
        output_ext: str = ".nii.gz",
        separate_folder: bool = False,
        run_options: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.postprocessing = kwargs.get("postprocessing")  # (MONAI keeps it only inside an event handler)
        self.run_options = dict(run_options) if run_options is not None else None
        self._in_run = False
        self.modalities = tuple(modalities) if modalities is not None else None
        self.output_dir = output_dir
        self.output_postfix = output_postfix
        self.output_ext = _dotted(output_ext)
        self.separate_folder = as_bool(separate_folder, "separate_folder")
        self.segmented: list[str] = []
        self.failed: dict[str, str] = {}
        self.untrained: list[str] = []
        self.checkpoint: str | None = None
        self.save_report = False
        self.report_key = "result"
        self.overwrite = False

    def run(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """With ``run_options``: :func:`run_inference` on this evaluator (its return value); else Ignite's ``run``."""
        if self.run_options is None or self._in_run:
            return super().run(*args, **kwargs)
        self._in_run = True
        try:
            options = {"network": self.network, **self.run_options}
            return run_inference(
                self,
                options.pop("studies"),
                str(self.output_dir),
                output_postfix=self.output_postfix,
                output_ext=self.output_ext,
                separate_folder=self.separate_folder,
                **options,
            )
        finally:
            self._in_run = False

    def _fail(self, case: str, message: str) -> dict:
        self.failed[case] = message
        logger.error(f"study {case} FAILED: {message}")
        return {}

    def _names(self, flags: Any) -> list[str]:
        flags = torch.as_tensor(flags).reshape(-1).bool().tolist()
        names = self.modalities or tuple(str(i) for i in range(len(flags)))
        return [n for n, f in zip(names, flags) if f]

    def _iteration(self, engine: SupervisedEvaluator, batchdata: dict[str, Any]) -> dict:  # type: ignore[override]
        case = str(_first(batchdata.get("case", engine.state.iteration)))
        never_used: dict[str, str] = {}
        if FAILURE_KEY in batchdata:
            return self._fail(case, str(_first(batchdata[FAILURE_KEY])))
        if self.untrained and self.modalities and "modality_mask" in batchdata:
            present = self._names(batchdata["modality_mask"])
            never = [m for m in present if m in self.untrained]
            source = f"the checkpoint {self.checkpoint} records no training iteration with "
            source += "it" if len(never) == 1 else "them"
            if never and len(never) == len(present):
                return self._fail(
                    case,
                    f"only {', '.join(never)} present, never seen in training ({source}): "
                    "refused, the result would come from untrained weights",
                )
            if never:
                drop = [self.modalities.index(m) for m in never]
                mask = torch.as_tensor(batchdata["modality_mask"]).clone()
                mask[..., drop] = False
                batchdata["modality_mask"] = mask
                batchdata[CommonKeys.IMAGE][:, drop] = 0
                never_used = {m: "never seen in training" for m in never}
                logger.warning(f"study {case}: {', '.join(never)} never seen in training ({source}): not used")
        if self.save_report:
            from .quality import REPORT_CONTEXT_KEY

            segmentation = output_path(
                case, str(self.output_dir), self.output_postfix, self.output_ext, self.separate_folder
            )
            context = {"not_used": never_used, "never_trained": self.untrained}
            batchdata[REPORT_CONTEXT_KEY] = [json.dumps({**context, "segmentation": os.path.basename(segmentation)})]
        try:
            output = super()._iteration(engine, batchdata)
        except Exception as exc:  # inference or writing of this study failed: report it, go on with the others
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return self._fail(case, describe_failure(exc))
        found = str(_first(batchdata.get(FOUND_KEY, "")))
        used = self._names(batchdata["modality_mask"]) if "modality_mask" in batchdata else []
        names = self.modalities or ()
        missing = [m for m in names if m not in used]
        if found == "4-D":
            files = "one 4-D file"
        else:
            files = "files for " + (", ".join(m for m in names if m in found.split(",")) or found)
            available = batchdata.get(f"image{AVAILABLE_POSTFIX}")
            if available is not None:
                empty = [m for m in found.split(",") if m and m not in self._names(available)]
                if empty:
                    files += f" ({', '.join(empty)} all zero: treated as missing)"
        target = (
            f" -> {output_path(case, self.output_dir, self.output_postfix, self.output_ext, self.separate_folder)}"
            if self.output_dir
            else ""
        )
        logger.info(
            f"study {case}: {files}; used {', '.join(used) or 'none'}"
            f"{'; missing ' + ', '.join(missing) if missing else ''}{target}"
        )
        uncertainty = _uncertainty_summary(output)
        if uncertainty is not None:
            from .uncertainty import uncertainty_line

            folder = os.path.dirname(
                output_path(
                    case, str(self.output_dir or "."), self.output_postfix, self.output_ext, self.separate_folder
                )
            )
            written = uncertainty.get("map")
            target_map = os.path.join(folder, written) if written else "map not saved"
            logger.info(uncertainty_line(case, uncertainty, target_map))
        if self.save_report and self.output_dir:
            try:
                self._write_report(case, output)
            except Exception as exc:
                return self._fail(case, describe_failure(exc))
        self.segmented.append(case)
        return output

    def _write_report(self, case: str, output: Any) -> None:
        """Write the report that :class:`~dmaf_components.quality.StudyReportd` put in the postprocessed output."""
        from .quality import REPORT_POSTFIX, report_line, write_json_atomic

        items = output if isinstance(output, list) else [output]
        report = next((i[self.report_key] for i in items if isinstance(i, Mapping) and self.report_key in i), None)
        if not isinstance(report, Mapping) or "case" not in report:
            raise DMAFDataError(f"study {case}: the postprocessing left no report under {self.report_key!r}")
        target = output_path(case, str(self.output_dir), REPORT_POSTFIX, ".json", self.separate_folder)
        write_json_atomic(dict(report), target, self.overwrite)
        logger.info(report_line(report, target))


def _report_step(evaluator: SupervisedEvaluator) -> Any:
    """The :class:`~dmaf_components.quality.StudyReportd` of ``evaluator``'s postprocessing, or None."""
    from .quality import StudyReportd

    post = getattr(evaluator, "postprocessing", None)
    transforms = post.flatten().transforms if isinstance(post, Compose) else [post]
    return next((t for t in transforms if isinstance(t, StudyReportd)), None)


def _uncertainty_summary(output: Any) -> dict | None:
    """The :class:`~dmaf_components.uncertainty.SaveUncertaintyd` summary in a postprocessed engine output (a list
    of one study's dicts), or None."""
    from .uncertainty import UNCERTAINTY_SUMMARY_KEY

    items = output if isinstance(output, list) else [output]
    for item in items:
        if isinstance(item, Mapping) and isinstance(item.get(UNCERTAINTY_SUMMARY_KEY), Mapping):
            return dict(item[UNCERTAINTY_SUMMARY_KEY])
    return None


def run_inference(
    evaluator: StudyEvaluator,
    studies: Sequence[Mapping],
    output_dir: str,
    network: torch.nn.Module | None = None,
    checkpoint: str | None = None,
    map_location: Any = None,
    dataset_dir: str | None = None,
    overwrite: bool = False,
    output_postfix: str = "seg",
    output_ext: str = ".nii.gz",
    separate_folder: bool = False,
    save_weights: bool = False,
    save_snapshot: bool = False,
    quality_table: str | None = None,
    save_report: Any = "auto",
    save_uncertainty: Any = False,
    uncertainty: str = "margin",
    uncertainty_threshold: Any = None,
) -> dict[str, Any]:
    """The bundle's inference run: checks, then every study, then a summary.

    Before any study is computed: the output names are planned (:func:`plan_outputs`: format, collisions, existing
    results, input folder; with ``save_weights`` the modality weight maps and their summary too, see
    :mod:`dmaf_components.weight_maps`; with ``save_snapshot`` the picture, :mod:`dmaf_components.snapshots`; with
    ``save_uncertainty`` the uncertainty map, :mod:`dmaf_components.uncertainty`, whose measure ``uncertainty`` and
    ``uncertainty_threshold`` are checked first), the checkpoint is loaded into
    ``network`` (:func:`~dmaf_components.checkpoints.load_model_weights`, a state dict or a training checkpoint;
    inference wrappers, :class:`~dmaf_components.weight_maps.ModalityWeightsNet` and
    :class:`~dmaf_components.uncertainty.UncertaintyNet`, are looked through: the checkpoint is the plain
    network's), and only then is ``output_dir`` created and test-written. A failure of
    any of these ends the run at once with :class:`BundleExit`. A training checkpoint's record of modalities never
    seen in training (:func:`untrained_modalities`) is passed to ``evaluator`` (:class:`StudyEvaluator`). Then
    ``evaluator`` runs over all studies; failed studies are reported one line each, and at the end
    :class:`BundleExit` carries the summary and one
    line per failed study (exit status 1).

    The quality table ``quality_table`` (``quality.json`` beside the weights, written by ``evaluate.json``,
    :mod:`dmaf_components.quality`) is read before the outputs are planned: a table of another model (its SHA-256
    differs from ``checkpoint``'s) ends the run before any study; no table is one note in the log.
    ``save_report``: ``auto`` (the bundle's default) writes ``<case>_report.json`` per study when a matching table
    was found or ``save_uncertainty`` is on (the report holds the uncertainty's summary), ``True`` always
    (``"expected": null`` without a table), ``False`` never (the table is not read); the reports are planned like
    the label maps.

    Returns:
        ``{"segmented": [case...], "failed": {case: line}, "outputs": {case: path}}`` when every study succeeded.
    """
    from .quality import load_quality_table, report_outputs
    from .snapshots import snapshot_outputs
    from .uncertainty import base_network, check_measure, check_threshold, uncertainty_outputs
    from .weight_maps import weight_map_outputs

    try:
        overwrite = as_bool(overwrite)
        auto = isinstance(save_report, str) and save_report.strip().lower() == "auto"
        report = auto or as_bool(save_report, "save_report")
        modalities = evaluator.modalities if isinstance(evaluator, StudyEvaluator) else None
        table = load_quality_table(quality_table, checkpoint, modalities) if report else None
        uncertainty_on = as_bool(save_uncertainty, "save_uncertainty")
        if uncertainty_on:
            try:
                check_measure(uncertainty)
                check_threshold(uncertainty_threshold, uncertainty)
            except ValueError as exc:
                raise DMAFDataError(str(exc)) from None
        report = report and (table is not None or uncertainty_on or not auto)
        step = _report_step(evaluator) if isinstance(evaluator, StudyEvaluator) else None
        if report and step is None:
            if not auto:
                raise DMAFDataError("save_report: the postprocessing has no StudyReportd step to compute the reports")
            logger.warning("note: the postprocessing has no StudyReportd step: no reports are written")
            report = False
        extra = weight_map_outputs() if as_bool(save_weights, "save_weights") else ()
        extra += snapshot_outputs() if as_bool(save_snapshot, "save_snapshot") else ()
        extra += uncertainty_outputs() if uncertainty_on else ()
        extra += report_outputs() if report else ()
        plan = plan_outputs(
            studies,
            output_dir,
            dataset_dir,
            overwrite,
            output_postfix,
            output_ext,
            as_bool(separate_folder, "separate_folder"),
            extra,
        )
        if checkpoint is not None:
            if network is None:
                raise DMAFDataError(f"{checkpoint}: no network given to load the checkpoint into")
            load_model_weights(base_network(network), checkpoint, map_location)
        prepare_output_dir(output_dir)
    except DMAFError as exc:
        raise BundleExit(str(exc)) from None
    if isinstance(evaluator, StudyEvaluator):
        evaluator.save_report, evaluator.overwrite = report, overwrite
        if step is not None:  # this run's decision, and the table read and checked once, above
            step.use_table(table)
            step.enabled, step.auto = report, False
            evaluator.report_key = step.report_key
    if checkpoint is not None and isinstance(evaluator, StudyEvaluator) and evaluator.modalities:
        never = untrained_modalities(checkpoint, evaluator.modalities)
        if never:
            evaluator.untrained, evaluator.checkpoint = never, str(checkpoint)
            logger.warning(
                f"{checkpoint}: {', '.join(never)} never seen in training (its DTM state): a study with only "
                f"{'this modality' if len(never) == 1 else 'these modalities'} is refused, beside others "
                f"{'it is' if len(never) == 1 else 'they are'} not used"
            )
    logger.info(f"inference: {len(studies)} stud{'y' if len(studies) == 1 else 'ies'} -> {output_dir}")
    evaluator.run()
    segmented, failed = list(evaluator.segmented), dict(evaluator.failed)
    for study in studies:  # a study the loader never delivered is a failure too, never a silent gap
        if study["case"] not in segmented and study["case"] not in failed:
            failed[study["case"]] = "not processed"
    summary = f"inference finished: {len(segmented)} segmented, {len(failed)} failed (results in {output_dir})"
    if failed:
        lines = [summary] + [f"{case}: {message}" for case, message in failed.items()]
        raise BundleExit("\n".join(lines))
    logger.info(summary)
    return {"segmented": segmented, "failed": failed, "outputs": {c: plan[c] for c in segmented}}
