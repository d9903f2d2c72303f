"""Every command of the model card's "MONAI Bundle Commands" section (bundle/docs/README.md), run as written on tiny
data: the card's data paths are replaced by tiny synthetic ones, and small widths, one epoch and one process are
added as overrides."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLE = os.path.join(REPO, "bundle")
CARD = os.path.join(BUNDLE, "docs", "README.md")
SCHEMA = os.path.join(os.path.dirname(REPO), "shared", "monai", "meta_schema_20240725.json")
if not os.path.isfile(SCHEMA):
    SCHEMA = os.path.join(REPO, "tests", "data", "meta_schema_20240725.json")
WIDTHS = ["--channels", "[4,8,16,32]", "--num_layers", "1"]
TINY = WIDTHS + ["--roi_size", "[32,32,32]", "--num_workers", "0"]


def card_commands(path: str = CARD) -> list[str]:
    """The commands of the card's "## MONAI Bundle Commands" section: every line of its fenced blocks, continuation
    lines joined."""
    with open(path) as f:
        text = f.read()
    section = text.split("## MONAI Bundle Commands", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", section, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.strip().startswith("#"):
                commands.append(line.strip())
    return commands


def _adapt(command: str, paths: dict[str, str]) -> list[str]:
    """The card's command as an argument list for this test: paths replaced, python/torchrun of this environment, one
    process, a free port, tiny overrides."""
    for placeholder, path in paths.items():
        command = command.replace(placeholder, path)
    args = shlex.split(command)
    if args[0] == "python":
        args[0] = sys.executable
    elif args[0] == "torchrun":
        args = [
            os.path.join(os.path.dirname(sys.executable), "torchrun"),
            "--master_port",
            str(29600 + os.getpid() % 1000),
        ] + [a.replace("--nproc_per_node=2", "--nproc_per_node=1") for a in args[1:]]
    verb = args[args.index("monai.bundle") + 1]
    if verb == "run":
        args += TINY + (["--epochs", "1", "--val_interval", "1"] if "configs/inference.json" not in args else [])
        if "training" in args or any("multi_gpu_train.json" in a for a in args):
            # the card's training commands are alternatives; this test runs them one after another in one bundle,
            # where a second training is refused unless told to replace the first one's models
            args += ["--overwrite", "True"]
    elif verb in ("verify_net_in_out", "ckpt_export"):
        args += WIDTHS
    return args


@pytest.fixture(scope="module")
def card_bundle(tiny_brats, tmp_path_factory):
    """A copy of the bundle (outputs stay out of the checkout), tiny data with a datalist, one study to segment."""
    from dmaf_components.data import build_datalist, write_datalist

    tmp = tmp_path_factory.mktemp("card")
    bundle = tmp / "bundle"
    shutil.copytree(BUNDLE, bundle, ignore=shutil.ignore_patterns("models", "eval", "runs", "outputs", "wheels"))
    (bundle / "eval").mkdir()
    shutil.copy(SCHEMA, bundle / "eval" / "schema.json")  # verify_metadata would download it (offline test)
    data = tmp / "brats"
    shutil.copytree(tiny_brats, data)
    write_datalist(build_datalist(str(data), "brats", split=(4, 1, 1), seed=0), str(data / "datalist.json"))
    studies = tmp / "studies"
    case = sorted(p for p in (data / "MICCAI_BraTS2020_TrainingData").iterdir() if p.is_dir())[0]
    shutil.copytree(case, studies / case.name, ignore=shutil.ignore_patterns("*seg*"))
    paths = {"/data/BraTS2020": str(data), "/data/new_studies": str(studies), "/data/seg": str(tmp / "seg")}
    return bundle, paths


def test_card_lists_the_bundle_commands():
    commands = card_commands()
    joined = "\n".join(commands)
    for needed in (
        "configs/train.json --dataset_dir",
        "multi_gpu_train.json",
        "configs/evaluate.json",
        "configs/inference.json --dataset_dir",
        "verify_metadata",
        "verify_net_in_out",
        "ckpt_export",
    ):
        assert needed in joined, needed
    assert all(c.startswith(("python -m monai.bundle ", "torchrun ")) for c in commands), commands


@pytest.mark.slow
def test_every_card_command_runs(card_bundle):
    bundle, paths = card_bundle
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for command in card_commands():
        proc = subprocess.run(_adapt(command, paths), cwd=bundle, capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, command + "\n" + proc.stdout[-2000:] + proc.stderr[-4000:]
        assert "no config of this run defines" not in proc.stderr, command + "\n" + proc.stderr[-2000:]
    assert (bundle / "models" / "model.pt").is_file() and (bundle / "eval" / "evaluation.csv").is_file()
    # the evaluation wrote models/quality.json for model.pt: inference found it and wrote the study's report
    assert (bundle / "models" / "quality.json").is_file()
    seg = sorted(os.listdir(paths["/data/seg"]))
    assert len(seg) == 2 and seg[0].endswith("_report.json") and seg[1].endswith("_seg.nii.gz")
    assert json.load(open(os.path.join(paths["/data/seg"], seg[0])))["expected"]["combination"] == "flair+t1+t1ce+t2"
    ts = torch.jit.load(str(bundle / "models" / "model.ts"))
    with torch.no_grad():
        out = ts(torch.randn(1, 4, 40, 32, 24), torch.tensor([[True, False, True, False]]))
    assert out.shape == (1, 4, 40, 32, 24)


def test_channel_def_is_keyed_by_the_label_values_inference_writes():
    """MONAI Label reads channel_def as label value -> name: its keys must be the values of the label maps
    (inference.json's label_values), and the names those of the network's channels in the same order."""
    import json
    import os

    bundle = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundle", "configs")
    meta = json.load(open(os.path.join(bundle, "metadata.json")))
    pred = meta["network_data_format"]["outputs"]["pred"]
    values = json.load(open(os.path.join(bundle, "inference.json")))["label_values"]
    assert [int(k) for k in pred["channel_def"]] == values == [0, 1, 2, 4]
    assert pred["num_channels"] == len(values)
    names = list(pred["channel_def"].values())
    assert names[0] == "background" and names[3] == "enhancing tumour"  # channel 3 of the network, label value 4
