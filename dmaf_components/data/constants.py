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
"""Layouts, modality orders and label sets of the supported datasets, and the error type of the data tools."""

from __future__ import annotations

from ..errors import DMAFDataError  # (the errors' home is errors.py, below every module; re-exported here)

__all__ = [
    "DMAFDataError",
    "BRATS_MODALITIES",
    "MYOPS_MODALITIES",
    "BRATS_LABELS",
    "MYOPS_LABELS",
    "BRATS_FILE_SUFFIX",
    "MYOPS_FILE_SUFFIX",
    "MODALITY_ALIASES",
    "LABEL_FILE_MARKERS",
]


#: canonical channel order for BraTS (the MSD Task01 order)
BRATS_MODALITIES = ("flair", "t1", "t1ce", "t2")
#: canonical channel order for MyoPS2020
MYOPS_MODALITIES = ("bssfp", "lge", "t2")
#: file-name suffix of each modality in the raw releases
BRATS_FILE_SUFFIX = {"flair": "flair", "t1": "t1", "t1ce": "t1ce", "t2": "t2"}
MYOPS_FILE_SUFFIX = {"bssfp": "C0", "lge": "DE", "t2": "T2"}
#: the one table of file-name aliases of each modality, as real releases spell them (lower case; ``-``, ``_``, space
#: or nothing between the parts of a multi-part alias). A file matches a modality when its name without extension,
#: stripped of surrounding whitespace and lower-cased, is an alias or ends with ``-``/``_``/``.``/space + alias
#: (:func:`dmaf_components.data.names.modality_of`): BraTS 2020 ``_flair/_t1/_t1ce/_t2``, BraTS 2021/2023
#: ``-t2f/-t1n/-t1c/-t2w``, MSD ``FLAIR/T1w/T1gd/T2w``, MyoPS ``_C0/_DE/_T2``.
MODALITY_ALIASES = {
    "flair": ("flair", "t2f", "t2-flair", "t2w-flair"),
    "t1": ("t1", "t1n", "t1w", "t1-native", "t1-pre", "t1-precontrast"),
    "t1ce": ("t1ce", "t1c", "t1gd", "t1-gd", "t1-ce", "t1w-ce", "t1wce", "t1-post", "t1-contrast", "ct1", "t1w-gd"),
    "t2": ("t2", "t2w"),
    "bssfp": ("bssfp", "c0", "cine"),
    "lge": ("lge", "de"),
}
#: markers of segmentation / label file names (lower case, at the end of the name): never a modality
LABEL_FILE_MARKERS = ("seg", "segm", "segmentation", "gd", "label", "labels", "mask", "gt")
#: BraTS label values in the files -> names (label 4 is trained as class 3)
BRATS_LABELS = {0: "background", 1: "necrotic/non-enhancing core", 2: "edema", 4: "enhancing tumour"}
#: trained MyoPS classes; edema and scar merge into myocardium, as the paper (raw values: myocardium 200,
#: LV 500, RV 600, edema 1220, scar 2221; the mapping is in bundle/configs/train_myops.json)
MYOPS_LABELS = {0: "background", 1: "LV blood pool", 2: "RV blood pool", 3: "myocardium"}
