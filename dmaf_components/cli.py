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

import fire

__all__ = ["main", "DMAF"]


class DMAF:
    """DMAF-Net tools: datalists, synthetic data, and the README demo."""

    def version(self) -> str:
        """Print the package version."""
        from . import __version__

        return __version__

    def demo(self, data_dir: str = "data/synthetic_brats") -> None:
        """Run the end-to-end demo on the embedded synthetic dataset (see README)."""
        from .demo import run_demo

        run_demo(data_dir)


def main() -> None:
    fire.Fire(DMAF)


if __name__ == "__main__":
    main()
