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
"""The voxels' SHA-256 of every NIfTI file of a BraTS-layout dataset, and one over them all.

Data made again elsewhere (another numpy or scipy may round differently) is compared with these before a study's
later seeds run on it. The first line names the versions that made the files' readers:

    python benchmarks/data_sha256.py data/anatomy_brats > data_sha256.txt
"""

from __future__ import annotations

import glob
import hashlib
import os
import sys


def main(root: str) -> None:
    import nibabel as nib
    import numpy as np
    import scipy

    total = hashlib.sha256()
    print(f"numpy {np.__version__} scipy {scipy.__version__} nibabel {nib.__version__}")
    for path in sorted(glob.glob(os.path.join(root, "*", "*", "*.nii.gz"))):
        digest = hashlib.sha256(np.ascontiguousarray(np.asarray(nib.load(path).dataobj)).tobytes()).hexdigest()
        total.update(digest.encode())
        print(digest, os.path.relpath(path, root))
    print(total.hexdigest(), "all voxels")


if __name__ == "__main__":
    main(sys.argv[1])
