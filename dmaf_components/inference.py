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

import logging
import os
import tempfile
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.data import Dataset
from monai.engines import SupervisedEvaluator
from monai.transforms import SaveImaged

from .checkpoints import load_model_weights
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
    "run_inference",
]

logger = logging.getLogger(__name__)

#: key of a sample that could not be prepared: one line naming the file and the cause
FAILURE_KEY = "inference_failure"
#: key holding the modalities a study has files for (comma-separated; ``4-D`` files list their non-zero channels)
FOUND_KEY = "modalities_found"
#: single-file formats a segmentation is written in: NIfTI (MONAI's ``NibabelWriter``), NRRD and MetaImage
#: (``ITKWriter``, whose LPS direction, origin and spacing come from the image's affine)
OUTPUT_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha")


class BundleExit(SystemExit):
    """Ends a bundle run with exit status 1 and ``message`` as the last line printed (no traceback).

    A :class:`SystemExit`, so that MONAI's ``ConfigExpression`` does not bury it under ``RuntimeError: Failed to
    evaluate ConfigExpression``; callers in Python catch it as ``SystemExit`` (``exc.code`` is the message).
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def as_bool(value: Any, name: str = "overwrite") -> bool:
    """A switch given in Python or on the command line: ``True``/``False``, or ``true``/``false``/``1``/``0``/``yes``/
    ``no`` in any case (fire passes ``--overwrite false`` as the string ``"false"``, which is truthy).

    Raises:
        DMAFDataError: any other value.
    """
    if isinstance(value, (bool, int)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "false", "0", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise DMAFDataError(f"{name}: expected true or false, got {value!r}")


def describe_failure(exc: BaseException) -> str:
    """One line for an exception raised while preparing or segmenting a study.

    MONAI wraps transform errors (``RuntimeError: applying transform ...``); the chain is followed to the
    :class:`DMAFDataError` (whose message names the file) or else to the innermost exception.
    """
    chain, seen = [], set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    data_errors = [e for e in chain if isinstance(e, DMAFDataError)]
    if data_errors:
        return str(data_errors[0]).strip().splitlines()[0]
    root = chain[-1]
    lines = [line.strip() for line in str(root).strip().splitlines() if line.strip()]
    return f"{type(root).__name__}: {lines[0]}" if lines else type(root).__name__


def exit_on_data_error(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``func(*args, **kwargs)``, turning a :class:`DMAFDataError` into :class:`BundleExit` (for bundle configs)."""
    try:
        return func(*args, **kwargs)
    except DMAFDataError as exc:
        raise BundleExit(str(exc)) from None


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
    except DMAFDataError as exc:
        raise BundleExit(str(exc)) from None
    if output_dir is not None:  # an earlier run's output folder inside dataset_dir: results, not a study
        out = os.path.realpath(output_dir)
        studies = [
            s for s in studies
            if not (s["image"] == {} and os.path.realpath(os.path.join(dataset_dir, s["case"])) == out)
        ]
        if not studies:
            raise BundleExit(f"{dataset_dir}: no study found besides the output folder {output_dir}")
    return studies


def _dotted(ext: str) -> str:
    ext = str(ext).strip().lower()
    return ext if ext.startswith(".") or not ext else "." + ext


def output_extension(output_ext: str) -> str:
    """``output_ext`` in lower case with its leading dot (``nrrd`` -> ``.nrrd``).

    Raises:
        DMAFDataError: not one of :data:`OUTPUT_EXTENSIONS`.
    """
    ext = _dotted(output_ext)
    if ext not in OUTPUT_EXTENSIONS:
        raise DMAFDataError(
            f"output_ext {output_ext!r}: not a supported output format; use .nii.gz (default), .nii, .nrrd or .mha"
        )
    return ext


def output_path(
    case: str,
    output_dir: str,
    output_postfix: str = "seg",
    output_ext: str = ".nii.gz",
    separate_folder: bool = False,
) -> str:
    """Where the segmentation of study ``case`` is written: ``<output_dir>/<case>_<postfix><ext>``, or
    ``<output_dir>/<case>/<case>_<postfix><ext>`` with ``separate_folder`` (as MONAI's ``SaveImage``)."""
    name = f"{case}_{output_postfix}" if output_postfix else case
    folder = os.path.join(output_dir, case) if separate_folder else output_dir
    return os.path.join(folder, name + output_ext)


def _source(study: Mapping, dataset_dir: str | None) -> str:
    if isinstance(study["image"], dict):
        if dataset_dir is not None and os.path.isdir(os.path.join(dataset_dir, study["case"])):
            return os.path.join(dataset_dir, study["case"]) + os.sep
        folder = os.path.dirname(next(iter(study["image"].values()))) if study["image"] else None
        if folder is None and dataset_dir is not None:
            folder = os.path.join(dataset_dir, study["case"])
        return (folder or study["case"]) + os.sep
    return str(study["image"])


def plan_outputs(
    studies: Sequence[Mapping],
    output_dir: str,
    dataset_dir: str | None = None,
    overwrite: bool = False,
    output_postfix: str = "seg",
    output_ext: str = ".nii.gz",
    separate_folder: bool = False,
    extra_outputs: Sequence[tuple[str, str]] = (),
) -> dict[str, str]:
    """Output file of every study, checked before anything is computed or written.

    Args:
        studies: :func:`discover_studies` entries.
        output_dir, output_postfix, output_ext, separate_folder: where results go (:func:`output_path`).
        dataset_dir: the input folder (for messages, and refused as ``output_dir``).
        overwrite: replace existing results.
        extra_outputs: ``(postfix, ext)`` of further files written per study next to the segmentation (e.g. the
            modality weight maps), checked the same way.

    Returns:
        ``{case: segmentation path}``.

    Raises:
        DMAFDataError: one line: ``output_dir`` is a file, the input folder or a folder holding input files; the
            output format is not supported; two studies would write the same file (e.g. a folder ``case001/`` and a
            4-D ``case001.nii.gz``; names are compared case-insensitively, as macOS and Windows do); results exist
            already and ``overwrite`` is off (they are listed).
    """
    output_ext = output_extension(output_ext)
    out = os.path.realpath(output_dir)
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise DMAFDataError(f"output_dir {output_dir}: exists and is not a folder")
    if dataset_dir is not None and os.path.realpath(dataset_dir) == out:
        raise DMAFDataError(f"output_dir {output_dir}: is the input folder; choose a separate output folder")
    plan: dict[str, str] = {}
    planned: list[str] = []
    owners: dict[str, Mapping] = {}
    inputs: dict[str, str] = {}
    for i, study in enumerate(studies):
        _check_entry(i, study)
        paths = study["image"].values() if isinstance(study["image"], dict) else [study["image"]]
        inputs.update({os.path.realpath(p): p for p in paths})
        for path in paths:
            if out in (os.path.realpath(os.path.dirname(path)), os.path.realpath(path)):  # a file's or series' folder
                raise DMAFDataError(f"output_dir {output_dir}: holds input {path}; choose a separate output folder")
        target = output_path(study["case"], output_dir, output_postfix, output_ext, separate_folder)
        targets = [target] + [
            output_path(study["case"], output_dir, postfix, ext, separate_folder) for postfix, ext in extra_outputs
        ]
        for path in targets:
            if os.path.realpath(path) in inputs:  # e.g. --separate_folder with the inputs in OUT/<case>/
                raise DMAFDataError(f"{path}: would overwrite the input {inputs[os.path.realpath(path)]}; choose "
                                    "another --output_dir or --output_postfix")
            key = os.path.relpath(path, output_dir).lower()
            if key in owners:
                raise DMAFDataError(
                    f"{_source(owners[key], dataset_dir)} and {_source(study, dataset_dir)} would both be written to "
                    f"{path}; rename one of them"
                )
            owners[key] = study
        planned.extend(targets)
        plan[study["case"]] = target
    if not overwrite:
        existing = [p for p in planned if os.path.lexists(p)]
        if existing:
            shown = ", ".join(os.path.basename(p) for p in existing[:5]) + (" ..." if len(existing) > 5 else "")
            raise DMAFDataError(
                f"output_dir {output_dir}: {len(existing)} result(s) exist already ({shown}); they are kept: pass "
                "--overwrite true to replace them, or choose another --output_dir"
            )
    return plan


def _check_entry(index: int, study: Any) -> None:
    """One ``data`` entry: ``{"case": name, "image": path or {modality: path}}`` (one line naming the entry)."""
    where = f"data[{index}]"
    if not isinstance(study, Mapping):
        raise DMAFDataError(f"{where}: expected {{'case': name, 'image': path or {{modality: path}}}}, got {study!r}")
    if not isinstance(study.get("case"), str) or not study["case"]:
        raise DMAFDataError(f"{where}: no 'case' name (it names the result file)")
    image = study.get("image")
    paths = list(image.values()) if isinstance(image, Mapping) else [image]
    if STUDY_ERROR_KEY in study and not paths:  # a study found unusable: it is reported as failed, not read
        return
    if not paths or not all(isinstance(p, (str, os.PathLike)) and os.fspath(p) for p in paths):
        raise DMAFDataError(f"{where} ({study['case']}): 'image' must be a path or {{modality: path}}, got {image!r}")


def prepare_output_dir(output_dir: str) -> str:
    """Create ``output_dir`` and check that a file can be written there (a temporary file, removed at once).

    Raises:
        DMAFDataError: one line naming the folder, when it cannot be created or written.
    """
    try:
        os.makedirs(output_dir, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".dmaf_write_test_", dir=output_dir)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise DMAFDataError(
            f"output_dir {output_dir}: not writable ({type(exc).__name__}: {exc.strerror or exc})"
        ) from None
    return output_dir


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


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, (list, tuple)) and value else value


class StudyEvaluator(SupervisedEvaluator):
    """``SupervisedEvaluator`` that segments every good study and records the others.

    A batch (one study) flagged by :class:`StudyDataset`, or whose inference or postprocessing (writing included)
    raises, is logged as one line ``study <case> FAILED: <file>: <cause>`` and recorded in :attr:`failed`; the run
    goes on. Each segmented study is logged with the modalities it has files for and the ones the network used.

    Args:
        modalities: canonical channel order, for the log lines.
        output_dir, output_postfix, output_ext, separate_folder: where results go (:func:`output_path`), for the log
            lines.
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
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.modalities = tuple(modalities) if modalities is not None else None
        self.output_dir = output_dir
        self.output_postfix = output_postfix
        self.output_ext = _dotted(output_ext)
        self.separate_folder = as_bool(separate_folder, "separate_folder")
        self.segmented: list[str] = []
        self.failed: dict[str, str] = {}

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
        if FAILURE_KEY in batchdata:
            return self._fail(case, str(_first(batchdata[FAILURE_KEY])))
        try:
            output = super()._iteration(engine, batchdata)
        except Exception as exc:  # inference or writing of this study failed: report it, go on with the others
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return self._fail(case, describe_failure(exc))
        self.segmented.append(case)
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
        return output


class AtomicSaveImaged(SaveImaged):
    """``SaveImaged`` that writes to a temporary file in the output folder and renames it into place.

    The file is named ``<output_dir>/<data[name_key]>_<output_postfix><output_ext>``, or
    ``<output_dir>/<data[name_key]>/<data[name_key]>_<output_postfix><output_ext>`` with ``separate_folder`` (the
    name planned by :func:`plan_outputs`; without ``name_key`` in the data, ``SaveImaged``'s own naming). The format
    follows ``output_ext`` as in ``SaveImaged``: NIfTI by default, NRRD (``.nrrd``) or MetaImage (``.mha``) through
    MONAI's ``ITKWriter``, on the grid and affine of the image's metadata. It is written as
    ``.<name>.tmp<pid><output_ext>``, flushed to disk, then moved with ``os.replace``: a killed run leaves no
    truncated file under the final name. Without ``overwrite``, an existing result is never replaced (one-line
    error). MONAI Label drops it with every ``SaveImaged`` from the bundle's postprocessing.

    Args:
        name_key: data key holding the study name.
        overwrite: replace an existing result.
        separate_folder: one folder per study (default False, unlike ``SaveImaged``).
        keys, output_dir, output_postfix, kwargs: ``SaveImaged``'s.
    """

    def __init__(
        self,
        keys: Any,
        output_dir: str = "./",
        output_postfix: str = "trans",
        name_key: str = "case",
        overwrite: bool = False,
        separate_folder: bool = False,
        **kwargs: Any,
    ) -> None:
        separate_folder = as_bool(separate_folder, "separate_folder")
        super().__init__(
            keys, output_dir=output_dir, output_postfix=output_postfix, separate_folder=separate_folder, **kwargs
        )
        self.output_dir = str(output_dir)
        self.output_postfix = str(output_postfix)
        self.name_key = name_key
        self.overwrite = as_bool(overwrite)
        self.separate_folder = separate_folder

    def _target(self, data: Mapping[Hashable, Any], img: Any, meta: Mapping | None) -> str:
        name = data.get(self.name_key)
        if isinstance(name, str) and name:
            return output_path(name, self.output_dir, self.output_postfix, self.saver.output_ext, self.separate_folder)
        meta = img.meta if hasattr(img, "meta") else meta
        return str(self.saver.folder_layout.filename(**self.saver.fname_formatter(meta, self.saver)))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key, meta_key, meta_key_postfix in self.key_iterator(d, self.meta_keys, self.meta_key_postfix):
            if meta_key is None and meta_key_postfix is not None:
                meta_key = f"{key}_{meta_key_postfix}"
            meta = d.get(meta_key) if meta_key is not None else None
            target = self._target(d, d[key], meta)
            if not self.overwrite and os.path.lexists(target):
                raise DMAFDataError(f"{target}: exists already; kept (pass --overwrite true to replace it)")
            folder, base = os.path.split(target)
            ext = self.saver.output_ext
            stem = os.path.join(folder, f".{base[: len(base) - len(ext)]}.tmp{os.getpid()}")
            tmp = stem + ext
            try:
                os.makedirs(folder, exist_ok=True)
                self.saver(img=d[key], meta_data=meta, filename=stem)
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, target)
            except BaseException as exc:  # Ctrl-C included: never leave the temporary file behind
                if os.path.lexists(tmp):
                    os.remove(tmp)
                if not isinstance(exc, Exception):
                    raise
                raise DMAFDataError(f"{target}: cannot write the result ({describe_failure(exc)})") from None
        return d


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
) -> dict[str, Any]:
    """The bundle's inference run: checks, then every study, then a summary.

    Before any study is computed: the output names are planned (:func:`plan_outputs`: format, collisions, existing
    results, input folder; with ``save_weights`` the modality weight maps and their summary too, see
    :mod:`dmaf_components.weight_maps`), the checkpoint is loaded into ``network``
    (:func:`~dmaf_components.checkpoints.load_model_weights`, a state dict or a training checkpoint; a
    :class:`~dmaf_components.weight_maps.ModalityWeightsNet` is looked through, the checkpoint is the plain
    network's), and only then is ``output_dir`` created and test-written. A failure of
    any of these ends the run at once with :class:`BundleExit`. Then ``evaluator`` runs over all studies;
    failed studies are reported one line each, and at the end :class:`BundleExit` carries the summary and one
    line per failed study (exit status 1).

    Returns:
        ``{"segmented": [case...], "failed": {case: line}, "outputs": {case: path}}`` when every study succeeded.
    """
    from .weight_maps import ModalityWeightsNet, weight_map_outputs

    try:
        overwrite = as_bool(overwrite)
        extra = weight_map_outputs() if as_bool(save_weights, "save_weights") else ()
        plan = plan_outputs(
            studies, output_dir, dataset_dir, overwrite, output_postfix, output_ext,
            as_bool(separate_folder, "separate_folder"), extra,
        )
        if checkpoint is not None:
            if network is None:
                raise DMAFDataError(f"{checkpoint}: no network given to load the checkpoint into")
            load_model_weights(
                network.network if isinstance(network, ModalityWeightsNet) else network, checkpoint, map_location
            )
        prepare_output_dir(output_dir)
    except DMAFDataError as exc:
        raise BundleExit(str(exc)) from None
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
