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
"""Where results go and how they are written: complete and new, or, when anything fails, the earlier file as it was.

- :func:`output_path` / :func:`output_extension`: a study's result name and format;
- :func:`plan_outputs` / :func:`prepare_output_dir`: before an inference computes anything, every study's result
  names (collisions, existing results kept unless ``overwrite``, never the input folder), then the output folder
  created and test-written;
- :func:`atomic_write`: a hidden temporary file in the target's folder, flushed to disk, then ``os.replace``; on any
  failure (a full disk, Ctrl-C) the temporary file is removed and the target is untouched (the quality table,
  reports, snapshots, weight summaries, the final model); one-line errors. It is built on :func:`atomic_replace`
  (``data/atomic.py``, re-exported here), the one implementation, which the data tools below this module use
  directly;
- :class:`AtomicSaveImaged`: the same for images through MONAI's ``SaveImaged``, with one writer whose error is
  raised and the file read back before it replaces anything (label maps, weight maps).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import IO, Any

import numpy as np
from monai.transforms import SaveImaged

from .data.atomic import atomic_replace
from .data.constants import DMAFDataError
from .data.names import is_nifti
from .data.readers import first_line, itk_reason
from .data.studies import STUDY_ERROR_KEY
from .errors import DMAFError, as_bool, describe_failure

__all__ = [
    "plan_outputs",
    "prepare_output_dir",
    "OUTPUT_EXTENSIONS",
    "output_extension",
    "output_path",
    "atomic_replace",
    "atomic_write",
    "AtomicSaveImaged",
    "float_map_saver",
]

#: single-file formats a segmentation is written in: NIfTI (MONAI's ``NibabelWriter``), NRRD and MetaImage
#: (``ITKWriter``, whose LPS direction, origin and spacing come from the image's affine)
OUTPUT_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha")


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


def _reason(exc: BaseException) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"


def atomic_write(
    target: str,
    write: Callable[[IO[Any]], None],
    binary: bool = False,
    overwrite: bool = True,
    what: str = "",
) -> str:
    """Write ``target`` through ``write(file)`` atomically (:func:`~dmaf_components.data.atomic.atomic_replace`),
    refusing to replace an existing file unless ``overwrite`` and failing in one line that names it.

    Args:
        target: the file to write.
        write: writes the content into the open temporary file.
        binary: open the temporary file in binary mode.
        overwrite: replace an existing ``target``; when False an existing one is kept and an error raised.
        what: what the file is, for the error message (e.g. ``"the snapshot"``).

    Returns:
        ``target``.

    Raises:
        DMAFDataError: ``target`` exists and ``overwrite`` is off, or it cannot be written (one line naming it).
    """
    if not overwrite and os.path.lexists(target):
        raise DMAFDataError(f"{target}: exists already; kept (pass --overwrite true to replace it)")
    try:
        atomic_replace(target, write, binary=binary)
    except DMAFError:
        raise
    except Exception as exc:
        raise DMAFDataError(f"{target}: cannot write {what or 'the file'} ({_reason(exc)})") from None
    return target


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
            raise DMAFDataError(f"the file written does not read back: {first_line(exc)}") from None
        shape = tuple(img.shape)
    else:
        import itk

        try:
            data = itk.array_view_from_image(itk.imread(path))
        except Exception as exc:
            raise DMAFDataError(f"the file written does not read back: ITK: {itk_reason(exc)}") from None
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
    ``.<name>.tmp<random><output_ext>``, read back in full (header and every voxel), flushed to disk, then moved with
    ``os.replace`` (:func:`atomic_replace`): a killed run or a full disk leaves no truncated file under the final
    name, and an earlier result stays as it was. Only the writer MONAI tries first for the extension is used
    (``writer`` overrides it), and its error is raised: ``SaveImage`` would log it at INFO and fall back to another
    writer (ITK for ``.nii.gz``, which truncates a file on a full disk without raising). Without ``overwrite``, an
    existing result is never replaced (one-line error). MONAI Label drops it with every ``SaveImaged`` from the
    bundle's postprocessing.

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
            raise DMAFDataError(f"ITK: {itk_reason(failure)}")
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
            ext = self.saver.output_ext
            resampled = bool(self.saver.meta_kwargs.get("resample"))
            numel = None if resampled else int(np.prod(d[key].shape))

            def write(tmp: str) -> None:
                self._write(d[key], meta, tmp[: len(tmp) - len(ext)])  # the writer appends output_ext
                _read_back(tmp, numel)

            try:
                atomic_replace(target, write, by_path=True, suffix=ext)
            except Exception as exc:
                raise DMAFDataError(f"{target}: cannot write the result ({describe_failure(exc)})") from None
        return d


def float_map_saver(
    key: Any, output_dir: str, output_postfix: str, separate_folder: bool, name_key: str, overwrite: bool
) -> AtomicSaveImaged:
    """The saver of a per-voxel float map beside a study's label map (``<case>_<postfix>.nii.gz``, float32, on the
    grid and affine the map carries: no resampling), as the weight and uncertainty maps are written."""
    return AtomicSaveImaged(
        key,
        output_dir=output_dir,
        output_postfix=output_postfix,
        output_ext=".nii.gz",
        output_dtype=np.float32,
        resample=False,
        separate_folder=separate_folder,
        print_log=False,
        name_key=name_key,
        overwrite=overwrite,
    )


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
        studies: :func:`~dmaf_components.inference.discover_studies` entries.
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
                raise DMAFDataError(
                    f"{path}: would overwrite the input {inputs[os.path.realpath(path)]}; choose "
                    "another --output_dir or --output_postfix"
                )
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
