"""MONAI model-zoo conformance: the TorchScript export as the zoo makes it (scripted, any size, any mask), the zoo's
`verify_bundle -m full` checks run offline with MONAI's own functions, the zoo's config key names, the warning on
unknown command-line keys, and the bundle's package as a wheel."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLE = os.path.join(REPO, "bundle")
SCHEMA = os.path.join(os.path.dirname(REPO), "shared", "monai", "meta_schema_20240725.json")
if not os.path.isfile(SCHEMA):  # checkout without ../shared: the vendored copy of the same file (tests/data/README.md)
    SCHEMA = os.path.join(REPO, "tests", "data", "meta_schema_20240725.json")


def _compare(eager: torch.Tensor, exported: torch.Tensor, tol: float = 1e-4) -> None:
    """Logits within ``tol``; the same class wherever eager mode's top two logits are more than 2 * tol apart (an
    untrained network has exact near-ties, where float rounding alone may pick either class)."""
    assert eager.shape == exported.shape
    assert (eager - exported).abs().max().item() < tol
    top2 = eager.topk(2, dim=1).values
    decided = (top2[:, 0] - top2[:, 1]) > 2 * tol
    assert decided.float().mean() > 0.9
    assert torch.equal(eager.argmax(1)[decided], exported.argmax(1)[decided])


@pytest.mark.parametrize("fusion", ["dmaf", "concat"])
def test_scripted_export_runs_any_size_with_any_mask(tmp_path, tiny_net_kwargs, fusion):
    """torch.jit.script (what ckpt_export does by default) gives a model that takes (image, modality_mask) at sizes
    other than any example's, and matches eager mode."""
    from monai.networks.utils import convert_to_torchscript

    from dmaf_components.networks import DMAFNet

    net = DMAFNet(3, 4, 4, fusion=fusion, **tiny_net_kwargs).eval()
    convert_to_torchscript(net, str(tmp_path / "net.ts"))
    ts = torch.jit.load(str(tmp_path / "net.ts"))
    mixed = torch.tensor([[True, False, True, False], [False, True, True, True]])
    cases = [
        (torch.randn(2, 4, 24, 16, 32), mixed),  # mixed masks in one batch
        (torch.randn(1, 4, 32, 32, 16), torch.tensor([0, 0, 1, 1])),  # one study's mask as (M,) 0/1
        (torch.randn(1, 4, 17, 9, 25), torch.tensor([[True, True, False, True]])),  # odd sizes
    ]
    with torch.no_grad():
        for x, mask in cases:
            _compare(net(x, mask), ts(x, mask))
        x = torch.randn(1, 4, 16, 24, 16)
        x[:, 1] = 0  # no mask given: derived from the non-zero channels, as in eager mode
        _compare(net(x), ts(x))
    with pytest.raises(Exception, match="modality_mask must have shape"):
        ts(torch.randn(2, 4, 16, 16, 16), torch.ones(3, 4, dtype=torch.bool))


def test_scripted_export_2d(tiny_net_kwargs):
    from dmaf_components.networks import DMAFNet

    net = DMAFNet(2, 3, 4, **tiny_net_kwargs).eval()
    ts = torch.jit.script(net)
    mask = torch.tensor([[True, False, True], [True, True, True], [False, False, True]])
    with torch.no_grad():
        for size in ((48, 40), (33, 47)):
            x = torch.randn(3, 3, *size)
            _compare(net(x, mask), ts(x, mask))
    assert set(ts.state_dict()) == set(net.state_dict())  # same parameter names: a state dict loads into either


def test_zoo_full_mode_checks_offline(tmp_path):
    """What `ci/verify_bundle.py -m full` of Project-MONAI/model-zoo checks, with MONAI's functions, offline: files,
    version in the changelog, metadata against the schema, fake weights from network_def, verify_net_in_out,
    ckpt_export (scripted, default widths), loading the export. (The zoo's properties step is skipped by the zoo itself
    while supported_apps is empty; its version-uniqueness check needs the zoo's model_info.json.)"""
    from monai.bundle import ConfigParser, ckpt_export, verify_metadata, verify_net_in_out

    root = tmp_path / "dmaf_net"
    shutil.copytree(BUNDLE, root, ignore=shutil.ignore_patterns("models", "eval", "runs", "outputs", "wheels"))
    (root / "models").mkdir()
    (root / "eval").mkdir()
    shutil.copy(SCHEMA, root / "eval" / "schema.json")
    for f in ("configs/metadata.json", "LICENSE", "configs/inference.json"):
        assert (root / f).is_file(), f
    meta_file, config_file = str(root / "configs" / "metadata.json"), str(root / "configs" / "inference.json")
    with open(meta_file) as f:
        meta = json.load(f)
    assert meta["version"] in meta["changelog"]
    verify_metadata(meta_file=meta_file, filepath=str(root / "eval" / "schema.json"))

    # the zoo's fake-weights step: network_def of the inference config, its initial state dict as models/model.pt
    parser = ConfigParser()
    parser.read_config(f=config_file)
    parser.read_meta(f=meta_file)
    net = parser.get_parsed_content("network_def")
    torch.save(net.state_dict(), root / "models" / "model.pt")

    verify_net_in_out(net_id="network_def", meta_file=meta_file, config_file=config_file, bundle_root=str(root))
    ckpt_export(
        net_id="network_def",
        filepath=str(root / "models" / "verify_model.ts"),
        ckpt_file=str(root / "models" / "model.pt"),
        meta_file=meta_file,
        config_file=config_file,
        bundle_root=str(root),
    )
    ts = torch.jit.load(str(root / "models" / "verify_model.ts"))
    net.eval()
    x = torch.randn(1, 4, 32, 48, 40)  # not the 32^3 of verify_net_in_out
    mask = torch.tensor([[True, False, True, False]])
    with torch.no_grad():
        _compare(net(x, mask), ts(x, mask))


def test_zoo_key_names_and_aliases():
    """The zoo's names are the primary keys; the old names still work as overrides because the engines read the old
    name, which refers to the new one."""
    from monai.bundle import ConfigParser

    def parsed(overrides, *ids):
        parser = ConfigParser()
        parser.read_config(os.path.join(BUNDLE, "configs", "train.json"))
        parser.update(overrides)
        return [parser.get_parsed_content(i) for i in ids]

    assert parsed({}, "epochs", "max_epochs", "val_interval") == [300, 300, 10]
    assert parsed({"epochs": 1}, "max_epochs") == [1]
    assert parsed({"max_epochs": 2}, "max_epochs") == [2]
    assert parsed({"data_list_file_path": "/a.json"}, "datalist") == ["/a.json"]
    assert parsed({"datalist": "/b.json"}, "datalist") == ["/b.json"]
    with open(os.path.join(BUNDLE, "configs", "train.json")) as f:
        train = json.load(f)
    assert train["train"]["trainer"]["max_epochs"] == "@max_epochs"
    # MONAI Label's training request sets train#trainer#max_epochs: the schedule and the checks follow it
    assert parsed({"train#trainer#max_epochs": 10}, "lr_scheduler#total_iters", "train#handlers#1#max_epochs") == [
        10,
        10,
    ]
    assert train["lr_scheduler"]["total_iters"] == "@train#trainer#max_epochs"
    assert "checkpointloader" in train and train["checkpoint_loader"] == "@checkpointloader"
    assert "$@checkpoint_loader.attach(@train#trainer) if @resume_from else None" in train["run"]
    assert "@checkpointloader" not in json.dumps(train["run"])  # else --checkpoint_loader would be ignored


@pytest.mark.slow
def test_unknown_override_keys_warn(tmp_path):
    from dmaf_components.bundle_args import unknown_overrides, warn_unknown_overrides

    train = ["run", "--config_file", "configs/train.json"]
    cwd = os.getcwd()
    os.chdir(BUNDLE)
    try:
        assert (
            unknown_overrides(
                train
                + [
                    "--epochs",
                    "1",
                    "--max_epochs",
                    "2",
                    "--datalist",
                    "d.json",
                    "--data_list_file_path=d.json",
                    "--bundle_root",
                    ".",
                    "--meta_file",
                    "m",
                    "--train#trainer#max_epochs",
                    "3",
                    "--_meta_#version",
                    "9",
                ]
            )
            == []
        )
        evaluate = ["run", "--config_file", "['configs/train.json','configs/evaluate.json']"]
        assert unknown_overrides(evaluate + ["--ckpt_path", "m.pt"]) == []
        (msg,) = unknown_overrides(evaluate + ["--ckpt_pth", "m.pt"])
        assert "--ckpt_pth" in msg and "did you mean --ckpt_path?" in msg
        (msg,) = unknown_overrides(train + ["--train#trainer#max_epoch", "3"])
        assert "did you mean --train#trainer#max_epochs?" in msg
    finally:
        os.chdir(cwd)
    assert warn_unknown_overrides() == []  # not a `python -m monai.bundle` process: nothing to check

    # the real command line: `monai.bundle run` accepts the typo, the bundle warns about it
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            "configs/train.json",
            "--run_id",
            "network_def",
            "--bundle_root",
            str(tmp_path),
            "--epoch",
            "1",
            "--max_epochs",
            "1",
        ],
        cwd=BUNDLE,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--epoch: no config of this run defines this key (did you mean --epochs?)" in proc.stderr
    assert "--max_epochs is the old name of --epochs; it still works, but use --epochs" in proc.stderr
    assert "--max_epochs:" not in proc.stderr  # an old name is not an unknown key


def test_old_key_names_warn_and_refuse_a_clash(tmp_path):
    """The old names (max_epochs, datalist, checkpoint_loader) still reach the engines, warn, and are refused when the
    new name is given too with another value, since the run would silently use the old one's."""
    import json

    from dmaf_components.bundle_args import DEPRECATED_KEYS, deprecated_overrides, warn_unknown_overrides
    from dmaf_components.errors import DMAFConfigError

    train = json.load(open(os.path.join(BUNDLE, "configs", "train.json")))
    for old, new in DEPRECATED_KEYS.items():  # the old name refers to the new one, so an override of either counts
        assert train[old] == f"@{new}", old
    assert deprecated_overrides({"epochs": 3}) == []
    assert deprecated_overrides({"max_epochs": 3, "epochs": "3"}) == [
        "--max_epochs is the old name of --epochs; it still works, but use --epochs"
    ]
    with pytest.raises(DMAFConfigError, match=r"^--max_epochs 5 and --epochs 3 set the same key .*give only --epochs$"):
        deprecated_overrides({"max_epochs": 5, "epochs": 3})
    argv = ["python", "run", "--config_file", os.path.join(BUNDLE, "configs", "train.json"), "--datalist", "d.json"]
    with pytest.warns(FutureWarning, match="--datalist is the old name of --data_list_file_path"):
        assert warn_unknown_overrides(argv) == [
            "--datalist is the old name of --data_list_file_path; it still works, but use --data_list_file_path"
        ]
    argv[3] = os.path.join(BUNDLE, "configs", "inference.json")  # no datalist there: unknown, not "still works"
    (msg,) = warn_unknown_overrides(argv)
    assert msg.startswith("--datalist: no config of this run defines this key")
    # a user's config that sets the old name to a value would silently win over --epochs: refused
    mine = tmp_path / "mine.json"
    mine.write_text('{"max_epochs": 100}')
    files = f"['{os.path.join(BUNDLE, 'configs', 'train.json')}','{mine}']"
    with pytest.raises(DMAFConfigError, match=r"^--epochs 10: a config sets max_epochs .* to 100, which the run would"):
        warn_unknown_overrides(["python", "run", "--config_file", files, "--epochs", "10"])
    assert warn_unknown_overrides(["python", "run", "--config_file", files, "--max_epochs", "10"]) != []  # warns only


@pytest.mark.slow
def test_make_wheel_serves_the_required_package_version(tmp_path):
    """`make wheel` builds the wheel that metadata.json's required_packages_version names, and pip resolves that
    requirement from it without an index (as the zoo's install step does with PIP_FIND_LINKS)."""
    venv = sys.prefix
    proc = subprocess.run(
        [
            "make",
            "-s",
            "-C",
            REPO,
            "wheel",
            f"VENV={venv}",
            f"WHEEL_DIR={tmp_path}",
            "-o",
            os.path.join(venv, ".dmaf-installed"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    with open(os.path.join(BUNDLE, "configs", "metadata.json")) as f:
        version = json.load(f)["required_packages_version"]["dmaf-components"]
    wheel = tmp_path / f"dmaf_components-{version}-py3-none-any.whl"
    assert wheel.is_file(), os.listdir(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    assert "dmaf_components/networks/dmafnet.py" in names and "dmaf_components/bundle_args.py" in names
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--no-index",
            "--no-deps",
            "--ignore-installed",
            "--disable-pip-version-check",
            "--find-links",
            str(tmp_path),
            f"dmaf-components=={version}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and f"dmaf-components-{version}" in proc.stdout, proc.stdout + proc.stderr
