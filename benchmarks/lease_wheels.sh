#!/usr/bin/env bash
# Fill lease_wheels/ (ignored by git) with what benchmarks/gpu_lease.sh needs on a lent GPU machine beyond its image,
# here, where PyPI is reachable; then print the device tool's `carry` list and command.
#
# The lent machines' image (/work/.library/device/KINDS.md lists it: Python 3.12, torch, numpy, scipy, tensorboard,
# matplotlib, einops, attrs, packaging, typing-extensions, nvidia-ml-py, ...) lacks MONAI and the bundle's other
# packages, and the machine reaches no index. So lease_wheels/ holds:
#   - the wheels of monai, pytorch-ignite, nibabel, fire and jsonschema and of their dependencies the image lacks
#     (termcolor; jsonschema-specifications, referencing, rpds-py), each at the version installed in this checkout's
#     environment (the one the tests ran with), for CPython 3.12 on x86-64 linux; not itk (1.5 GB installed here, far
#     over what a call carries: only NRRD outputs and DICOM inputs need it, and the lease uses neither);
#   - requirements.txt, their pinned names, which gpu_lease.sh installs with pip --no-index --no-deps;
#   - mni/: the three MNI ICBM152 2009a template files of the anatomy profile (5 MB), taken out of the nilearn wheel,
#     so that the study's data is made on the lent machine (40 cases at 2 mm: about 120 MB of NIfTI, more than the
#     64 MiB a call carries; made there in seconds on 16 cores).
#
#   bash benchmarks/lease_wheels.sh            # PYTHON (default .venv/bin/python) gives the versions and runs pip
# PY_VERSION (default 3.12) is the lent machine's Python; NILEARN (default 0.14.1) the nilearn wheel the templates
# come from.
set -u
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
dest=lease_wheels
pyver=${PY_VERSION:-3.12}
packages=(monai pytorch-ignite nibabel fire termcolor jsonschema jsonschema-specifications referencing rpds-py)

# the versions this checkout's environment has
reqs=()
for p in "${packages[@]}"; do
  v=$("$py" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$p") \
    || { echo "lease_wheels: $p is not installed in $py's environment (make env first)" >&2; exit 1; }
  reqs+=("$p==$v")
done

rm -rf "$dest"
mkdir -p "$dest/mni"
# binary wheels for the lent machine's platform (pip matches manylinux tags exactly, so several are named)
"$py" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --python-version "$pyver" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$dest" "${reqs[@]}" || { echo "lease_wheels: pip download failed" >&2; exit 1; }
printf '%s\n' "${reqs[@]}" > "$dest/requirements.txt"

# the templates, from the nilearn wheel (nothing of nilearn is installed)
tmp=$(mktemp -d)
"$py" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: -d "$tmp" \
  "nilearn==${NILEARN:-0.14.1}" || { echo "lease_wheels: nilearn download failed" >&2; rm -rf "$tmp"; exit 1; }
"$py" - "$tmp"/nilearn-*.whl "$dest/mni" <<'EOF' || { rm -rf "$tmp"; exit 1; }
import os
import sys
import zipfile

from dmaf_components.data.anatomy import TEMPLATE_FILES

with zipfile.ZipFile(sys.argv[1]) as wheel:
    for name in TEMPLATE_FILES.values():
        with open(os.path.join(sys.argv[2], name), "wb") as f:
            f.write(wheel.read(f"nilearn/datasets/data/{name}"))
EOF
rm -rf "$tmp"

kib=$(du -sk "$dest" | cut -f1)
ls -l "$dest" "$dest/mni"
echo "lease_wheels: $((kib / 1024)) MiB in $dest (the working tree travels too: keep the total under 64 MiB)"
[ "$kib" -lt $((48 * 1024)) ] || { echo "lease_wheels: over 48 MiB; too much to carry" >&2; exit 1; }
cat <<EOF

device tool call (from the repository root):
  carry:     ["$dest"]
  timeout_s: 600
  command:   CODE_COMMIT=$(git rev-parse HEAD 2>/dev/null || echo '<commit>') bash benchmarks/gpu_lease.sh
EOF
