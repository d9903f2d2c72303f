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

import numpy as np
import torch
from monai.data import Dataset
from monai.engines import SupervisedEvaluator
from monai.transforms import SaveImaged
from monai.utils import CommonKeys

from .checkpoints import load_model_weights
from .data.constants import DMAFDataError
from .data.names import is_nifti
from .data.studies import STUDY_ERROR_KEY, STUDY_NOTES_KEY, find_studies
from .transforms import AVAILABLE_POSTFIX, _first_line, _itk_reason

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


def untrained_modalities(checkpoint: str, modalities: Sequence[str]) -> list[str] | None:
    """The modalities that a training checkpoint records as never seen in training, in ``modalities`` order.

    The bundle's training checkpoints (``models/checkpoint_*.pt``) hold the state of the
    :class:`~dmaf_components.handlers.DynamicTrainingMonitor` under ``"dtm"``, whose ``seen`` flags which modalities
    were present in at least one training iteration (a modality missing from every training case, e.g. with
    ``--missing_rates t2=1``, has an untrained encoder). A plain state dict (``models/model.pt``) carries no such
    record.

    Returns:
        the never-seen modalities (empty when all were seen), or None when ``checkpoint`` carries no DTM state for
        ``len(modalities)`` modalities (plain state dict, older checkpoint, unreadable file).
    """
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

    With :attr:`save_report` (set by :func:`run_inference`) each segmented study also gets ``<case>_report.json``
    (:func:`~dmaf_components.quality.study_report` with :attr:`quality`, the model's quality table or None) and one
    log line; a report that cannot be written fails the study.

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
        self.untrained: list[str] = []
        self.checkpoint: str | None = None
        self.save_report = False
        self.quality: dict | None = None
        self.quality_path: str | None = None
        self.overwrite = False

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
                return self._fail(case, f"only {', '.join(never)} present, never seen in training ({source}): "
                                        "refused, the result would come from untrained weights")
            if never:
                drop = [self.modalities.index(m) for m in never]
                mask = torch.as_tensor(batchdata["modality_mask"]).clone()
                mask[..., drop] = False
                batchdata["modality_mask"] = mask
                batchdata[CommonKeys.IMAGE][:, drop] = 0
                never_used = {m: "never seen in training" for m in never}
                logger.warning(f"study {case}: {', '.join(never)} never seen in training ({source}): not used")
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
        if self.save_report and self.output_dir:
            found_names = list(names) if found == "4-D" else [m for m in found.split(",") if m]
            available = batchdata.get(f"image{AVAILABLE_POSTFIX}")
            zero = [] if available is None else [m for m in found_names if m not in self._names(available)]
            try:
                self._write_report(case, found_names, used, {**{m: "all zero" for m in zero}, **never_used})
            except Exception as exc:
                return self._fail(case, describe_failure(exc))
        self.segmented.append(case)
        return output

    def _write_report(self, case: str, found: list[str], used: list[str], not_used: dict[str, str]) -> None:
        from .quality import REPORT_POSTFIX, report_line, study_report, write_json_atomic

        target = output_path(case, str(self.output_dir), REPORT_POSTFIX, ".json", self.separate_folder)
        segmentation = output_path(case, str(self.output_dir), self.output_postfix, self.output_ext,
                                   self.separate_folder)
        report = study_report(case, self.modalities or tuple(found), found, used, self.quality, not_used,
                              self.untrained, os.path.basename(segmentation), self.quality_path)
        write_json_atomic(report, target, self.overwrite)
        logger.info(report_line(report, target))


class _OneWriter:
    """The one image writer class an :class:`AtomicSaveImaged` uses, standing in ``SaveImage.writers``.

    MONAI's ``SaveImage`` tries each writer resolved for the extension in turn, logs a writer's error at INFO
    ("unable to write") and goes on with the next: on a full disk nibabel raises ``OSError(ENOSPC)`` and ITK, tried
    next for ``.nii.gz``, truncates the file without raising. With this single writer (the one MONAI tries first) there
    is no fallback, and the error it raised is kept in :attr:`error`, so that the caller raises the writer's own error
    instead of ``SaveImage``'s "cannot find a suitable writer".

    Args:
        writer_cls: a ``monai.data.ImageWriter`` class.
    """

    def __init__(self, writer_cls: type) -> None:
        self.writer_cls = writer_cls
        self.error: Exception | None = None

    def __call__(self, **kwargs: Any) -> Any:
        self.error = None
        writer = self.writer_cls(**kwargs)
        for name in ("set_data_array", "set_metadata", "write"):
            setattr(writer, name, self._recorded(getattr(writer, name)))
        return writer

    def _recorded(self, method: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return method(*args, **kwargs)
            except Exception as exc:
                self.error = exc
                raise

        return call

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.writer_cls.__name__})"


def _read_back(path: str, numel: int | None) -> None:
    """Read a written image file in full, header and data (NIfTI through nibabel, NRRD/MetaImage through ITK).

    Raises:
        DMAFDataError: the file does not read back (truncated, corrupt) or holds another number of voxels than
            ``numel`` (when given).
    """
    if is_nifti(path):
        import nibabel as nib

        try:
            img = nib.load(path, mmap=False)  # read, not mapped: every byte is decoded, a truncated file raises
            data = np.asanyarray(img.dataobj)
        except Exception as exc:
            raise DMAFDataError(f"the file written does not read back: {_first_line(exc)}") from None
        shape = tuple(img.shape)
    else:
        import itk

        try:
            data = itk.array_view_from_image(itk.imread(path))
        except Exception as exc:
            raise DMAFDataError(f"the file written does not read back: ITK: {_itk_reason(exc)}") from None
        shape = tuple(data.shape)
    if numel is not None and data.size != numel:
        raise DMAFDataError(
            f"the file written does not read back: {data.size} voxels (shape {shape}), expected {numel}"
        )


class AtomicSaveImaged(SaveImaged):
    """``SaveImaged`` that writes to a temporary file in the output folder and renames it into place.

    The file is named ``<output_dir>/<data[name_key]>_<output_postfix><output_ext>``, or
    ``<output_dir>/<data[name_key]>/<data[name_key]>_<output_postfix><output_ext>`` with ``separate_folder`` (the
    name planned by :func:`plan_outputs`; without ``name_key`` in the data, ``SaveImaged``'s own naming). The format
    follows ``output_ext`` as in ``SaveImaged``: NIfTI by default, NRRD (``.nrrd``) or MetaImage (``.mha``) through
    MONAI's ``ITKWriter``, on the grid and affine of the image's metadata. It is written as
    ``.<name>.tmp<pid><output_ext>``, flushed to disk, read back in full (header and every voxel), then moved with
    ``os.replace``: a killed run or a full disk leaves no truncated file under the final name, and an earlier result
    stays as it was. Only the writer MONAI tries first for the extension is used (``writer`` overrides it), and its
    error is raised: ``SaveImage`` would log it at INFO and fall back to another writer (ITK for ``.nii.gz``, which
    truncates a file on a full disk without raising). Without ``overwrite``, an existing result is never replaced
    (one-line error). MONAI Label drops it with every ``SaveImaged`` from the bundle's postprocessing.

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
        self._writer = _OneWriter(self.saver.writers[0])
        self.saver.writers = (self._writer,)

    def _write(self, img: Any, meta: Mapping | None, stem: str) -> None:
        """Write ``img`` to ``stem + output_ext`` with the one writer, raising the writer's own error."""
        try:
            self.saver(img=img, meta_data=meta, filename=stem)
            return
        except Exception as exc:
            failure = self._writer.error or exc
        if "ITK ERROR" in str(failure):  # ITK's text starts with the C++ source location
            raise DMAFDataError(f"ITK: {_itk_reason(failure)}")
        raise failure

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
                self._write(d[key], meta, stem)
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
                resampled = bool(self.saver.meta_kwargs.get("resample"))
                _read_back(tmp, None if resampled else int(np.prod(d[key].shape)))
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
    save_snapshot: bool = False,
    quality_table: str | None = None,
    save_report: Any = "auto",
) -> dict[str, Any]:
    """The bundle's inference run: checks, then every study, then a summary.

    Before any study is computed: the output names are planned (:func:`plan_outputs`: format, collisions, existing
    results, input folder; with ``save_weights`` the modality weight maps and their summary too, see
    :mod:`dmaf_components.weight_maps`; with ``save_snapshot`` the picture, :mod:`dmaf_components.snapshots`), the
    checkpoint is loaded into ``network``
    (:func:`~dmaf_components.checkpoints.load_model_weights`, a state dict or a training checkpoint; a
    :class:`~dmaf_components.weight_maps.ModalityWeightsNet` is looked through, the checkpoint is the plain
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
    was found, ``True`` always (``"expected": null`` without a table), ``False`` never (the table is not read); the
    reports are planned like the label maps.

    Returns:
        ``{"segmented": [case...], "failed": {case: line}, "outputs": {case: path}}`` when every study succeeded.
    """
    from .quality import load_quality_table, report_outputs
    from .snapshots import snapshot_outputs
    from .weight_maps import ModalityWeightsNet, weight_map_outputs

    try:
        overwrite = as_bool(overwrite)
        auto = isinstance(save_report, str) and save_report.strip().lower() == "auto"
        report = auto or as_bool(save_report, "save_report")
        modalities = evaluator.modalities if isinstance(evaluator, StudyEvaluator) else None
        table = load_quality_table(quality_table, checkpoint, modalities) if report else None
        report = report and (table is not None or not auto)
        extra = weight_map_outputs() if as_bool(save_weights, "save_weights") else ()
        extra += snapshot_outputs() if as_bool(save_snapshot, "save_snapshot") else ()
        extra += report_outputs() if report else ()
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
    if isinstance(evaluator, StudyEvaluator):
        evaluator.save_report, evaluator.quality, evaluator.overwrite = report, table, overwrite
        evaluator.quality_path = None if table is None else str(quality_table)
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
