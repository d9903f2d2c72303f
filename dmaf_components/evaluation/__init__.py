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
"""Evaluation over every combination of available modalities (paper Table 2): Dice and HD95 per region.

The evaluation is a MONAI ``SupervisedEvaluator`` (``bundle/configs/evaluate.json``) whose data are (case,
combination) pairs: :class:`CombinationPairs` loads each case once and hands it on once per combination with the
combination's missing channels zeroed and ``modality_mask`` set. Postprocessing maps prediction and label to
region channels (:class:`~dmaf_components.transforms.LabelToRegionsd`, BraTS also after :class:`SuppressSmallETd`),
:class:`RegionDice` / :class:`RegionHausdorffDistance` keep every pair's value per region, and
:class:`CombinationTables` turns them into the Table-2-shaped CSV/JSON/PNG (rank 0 writes; the values of all ranks
are gathered first, so multi-GPU evaluation writes the same table).

Modules: :mod:`~dmaf_components.evaluation.combinations` (the pairs, the regions, ET post-processing),
:mod:`~dmaf_components.evaluation.metrics` (Dice and HD95 per pair) and :mod:`~dmaf_components.evaluation.tables`
(the tables and files). Every name is importable from ``dmaf_components.evaluation``, as the bundle's configs use them.
"""

from __future__ import annotations

from .combinations import (
    REGIONS,
    CombinationPairs,
    PairNames,
    SuppressSmallETd,
    check_enough_cases,
    combination_name,
    modality_combinations,
    skip_absent_combinations,
    suppress_small_et,
)
from .metrics import BRATS_EMPTY_HD95, RegionDice, RegionHausdorffDistance
from .tables import CombinationTables, format_table, summarize, write_evaluation

__all__ = [
    "REGIONS",
    "check_enough_cases",
    "modality_combinations",
    "combination_name",
    "suppress_small_et",
    "format_table",
    "CombinationPairs",
    "skip_absent_combinations",
    "SuppressSmallETd",
    "RegionDice",
    "BRATS_EMPTY_HD95",
    "RegionHausdorffDistance",
    "PairNames",
    "summarize",
    "write_evaluation",
    "CombinationTables",
]
