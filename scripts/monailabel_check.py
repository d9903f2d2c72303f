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
"""End-to-end check that MONAI Label 0.8.5 serves the DMAF-Net bundle (run by ``make monailabel-check`` / CI).

1. makes synthetic 4-channel studies (MSD channel order, one all-zero channel = a missing modality) with labels in
   a MONAI Label datastore layout, and a small trained ``model.pt`` (one short training run of the bundle);
2. copies MONAI Label's ``monaibundle`` app and places the bundle at ``<app>/model/dmaf_brats``;
3. starts ``monailabel start_server`` (its own virtual environment) on a free 127.0.0.1 port;
4. ``GET /info/``: the model and its labels (value -> name from ``metadata.json``);
5. ``POST /infer/dmaf_brats?image=<id>``: the label map has values in {0, 1, 2, 4}, the study's shape and affine,
   and equals what the bundle's own ``inference.json`` writes with the same weights (a silently unloaded
   ``model.pt`` would differ); with ``output=json`` the response carries the study's report: the modalities used
   (the all-zero T1 left out), the expected Dice of that combination from the ``quality.json`` that the bundle's
   ``evaluate.json`` wrote beside ``model.pt``, the gain of acquiring T1, and the uncertainty's summary per region;
6. ``POST /train/dmaf_brats`` for one epoch, polled until it finishes;
7. stops the server by its PID. Every wait is bounded.

``--work DIR`` is cleared before a run only when this check made it: a new or empty folder gets the marker file
``.dmaf_monailabel_check``, and a folder with that marker (or with only what an earlier version of the check left
there) is emptied at the next run. Any other non-empty folder, or a file, is refused with one line and exit status
2, and nothing in it is touched.

Usage: python scripts/monailabel_check.py --monailabel-python .venv-monailabel/bin/python --work /tmp/mlcheck
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import nibabel as nib
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLE = os.path.join(ROOT, "bundle")
MODEL = "dmaf_brats"
#: the check runs on 2 CPU cores: smaller patches than the paper's 128^3 (the network itself is the default one)
SMALL = {"roi_size": [64, 64, 64]}
#: inference as a server runs it: the uncertainty's summary in the response, no map written per request
SERVER = {"save_uncertainty": True, "save_uncertainty_map": False}


#: file that marks a --work folder as made by this check, so that a later run may empty it
WORK_MARKER = ".dmaf_monailabel_check"
#: what this check writes in --work (an earlier version's folder, made before the marker, holds only these)
_WORK_ENTRIES = {"studies", "apps", "in", "seg", "server.log", "infer_result.nii.gz"}


def prepare_work_dir(work: str) -> str:
    """Make ``work`` an empty folder holding only :data:`WORK_MARKER`, deleting only what this check made.

    A missing or empty folder is used; a folder with the marker, or an earlier version's folder (only entries this
    check writes, ``studies/`` and ``apps/monaibundle/`` among them), is emptied (links inside are removed, never
    followed).

    Raises:
        ValueError: one line naming the folder: it is a file, or it holds files this check did not make (nothing is
            deleted).
    """
    if os.path.lexists(work) and not os.path.isdir(work):
        raise ValueError(f"--work {work}: is not a folder; give a new or empty folder")
    entries = sorted(os.listdir(work)) if os.path.isdir(work) else []
    earlier = (
        set(entries) <= _WORK_ENTRIES
        and {"studies", "apps"} <= set(entries)
        and os.path.isdir(os.path.join(work, "apps", "monaibundle"))
    )
    if entries and WORK_MARKER not in entries and not earlier:
        shown = ", ".join(entries[:5]) + (" ..." if len(entries) > 5 else "")
        raise ValueError(
            f"--work {work}: holds files this check did not make ({shown}) and no {WORK_MARKER} marker; nothing was "
            "deleted: give a new or empty folder"
        )
    for name in entries:
        path = os.path.join(work, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    os.makedirs(work, exist_ok=True)
    with open(os.path.join(work, WORK_MARKER), "w") as f:
        f.write("made by scripts/monailabel_check.py; the next run empties this folder\n")
    return work


def log(msg: str) -> None:
    print(f"[monailabel-check] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 600):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.status, resp.headers, resp.read()


def make_studies(work: str) -> tuple[str, list[str]]:
    """Four 4-D studies (64 x 64 x 48, MSD order) in a MONAI Label datastore, labels in labels/final."""
    sys.path.insert(0, ROOT)
    from dmaf_components.data import BRATS_AFFINE, brats_case

    studies = os.path.join(work, "studies")
    os.makedirs(os.path.join(studies, "labels", "final"), exist_ok=True)
    names = []
    for i in range(4):
        images, label = brats_case((64, 64, 48), seed=100 + i)
        data = np.stack([images[m] for m in ("flair", "t1", "t1ce", "t2")], axis=-1)
        if i % 2 == 1:
            data[..., 1] = 0  # T1 missing
        name = f"study_{i:02d}"
        nib.save(nib.Nifti1Image(data, BRATS_AFFINE), os.path.join(studies, f"{name}.nii.gz"))
        nib.save(nib.Nifti1Image(label, BRATS_AFFINE), os.path.join(studies, "labels", "final", f"{name}.nii.gz"))
        names.append(name)
    return studies, names


def patch_configs(bundle_dir: str) -> None:
    """Smaller sliding-window patches for a 2-core check, the uncertainty on for inference (its summary, no map);
    everything else is the shipped bundle."""
    for cfg in ("train.json", "inference.json"):
        path = os.path.join(bundle_dir, "configs", cfg)
        config = json.load(open(path))
        config.update(SMALL)
        if cfg == "inference.json":
            config.update(SERVER)
        json.dump(config, open(path, "w"), indent=4)


def train_small_model(bundle_dir: str, studies: str, names: list[str]) -> None:
    """One short training run of the bundle (main environment) so that model.pt holds trained weights, then its
    evaluation (``evaluate.json``, every modality combination of one study) so that ``quality.json`` lies beside it,
    as it does beside released weights."""
    data = [
        {
            "image": os.path.join(studies, f"{n}.nii.gz"),
            "label": os.path.join(studies, "labels", "final", f"{n}.nii.gz"),
        }
        for n in names
    ]
    datalist = os.path.join(bundle_dir, "check_datalist.json")
    common = [
        "--dataset_dir",
        studies,
        "--data_list_file_path",
        datalist,
        "--bundle_root",
        bundle_dir,
        "--num_workers",
        "0",
    ]
    json.dump({"training": data[:3], "validation": data[3:], "testing": []}, open(datalist, "w"))
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        "configs/train.json",
        *common,
        "--epochs",
        "2",
        "--val_interval",
        "1",
        "--learning_rate",
        "0.001",
    ]
    subprocess.run(cmd, cwd=bundle_dir, check=True, stdout=subprocess.DEVNULL, timeout=900)
    # the evaluation's test case: the validation case of the training above (a case is in one section of a datalist)
    json.dump({"training": data[:3], "validation": [], "testing": data[3:]}, open(datalist, "w"))
    configs = "['configs/train.json','configs/evaluate.json']"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", configs, *common]
    subprocess.run(cmd, cwd=bundle_dir, check=True, stdout=subprocess.DEVNULL, timeout=900)
    if not os.path.isfile(os.path.join(bundle_dir, "models", "quality.json")):
        raise RuntimeError("evaluate.json wrote no models/quality.json")
    for f in os.listdir(os.path.join(bundle_dir, "models")):
        if f.startswith("checkpoint"):
            os.remove(os.path.join(bundle_dir, "models", f))  # keep model.pt only, as a released bundle
    os.remove(datalist)
    shutil.rmtree(os.path.join(bundle_dir, "eval"), ignore_errors=True)


def bundle_inference(bundle_dir: str, study: str, out_dir: str) -> str:
    """The bundle's own inference (main environment) on one study: the reference for MONAI Label's answer."""
    in_dir = os.path.join(out_dir, "in")
    os.makedirs(in_dir, exist_ok=True)
    shutil.copy(study, in_dir)
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        "configs/inference.json",
        "--dataset_dir",
        in_dir,
        "--bundle_root",
        bundle_dir,
        "--output_dir",
        os.path.join(out_dir, "seg"),
        "--num_workers",
        "0",
    ]
    subprocess.run(cmd, cwd=bundle_dir, check=True, stdout=subprocess.DEVNULL, timeout=600)
    name = os.path.basename(study).replace(".nii.gz", "_seg.nii.gz")
    return os.path.join(out_dir, "seg", name)


def check_report(response: dict) -> None:
    """The report in MONAI Label's infer response (``StudyReportd``) for the study whose T1 is all zero."""
    report = {k: response.get(k) for k in ("modalities_used", "expected", "advice", "uncertainty", "not_used")}
    log(f"/infer/ report: used {report['modalities_used']}, not used {report['not_used']}")
    assert report["modalities_used"] == ["flair", "t1ce", "t2"], report["modalities_used"]
    assert report["not_used"] == {"t1": "all zero"}, report["not_used"]
    expected = report["expected"]
    assert expected and expected["combination"] == "flair+t1ce+t2", expected
    assert set(expected["regions"]) == {"WT", "TC", "ET"}, expected
    log(
        "/infer/ report: expected Dice "
        + ", ".join(f"{r} {v['dice_mean']:.1f}" for r, v in expected["regions"].items())
    )
    advice = report["advice"]
    assert [a["modality"] for a in advice] == ["t1"] and advice[0]["combination"] == "flair+t1+t1ce+t2", advice
    log(f"/infer/ report: acquiring t1 would change mean Dice by {advice[0]['mean_gain']:+.1f}")
    uncertainty = report["uncertainty"]
    assert uncertainty and set(uncertainty["regions"]) == {"WT", "TC", "ET"} and uncertainty["map"] is None, uncertainty
    log(
        f"/infer/ report: {uncertainty['uncertain']['voxels']} uncertain voxels ({uncertainty['measure']} >= "
        f"{uncertainty['threshold']:g})"
    )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--monailabel-python", required=True, help="python of the MONAI Label environment")
    parser.add_argument("--work", default="/tmp/dmaf_monailabel_check")
    parser.add_argument("--timeout", type=int, default=900, help="seconds for the server to start or train")
    args = parser.parse_args()
    try:
        prepare_work_dir(args.work)
    except ValueError as exc:
        print(f"monailabel_check: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        where = exc.filename or args.work
        print(f"monailabel_check: error: --work {where}: cannot prepare ({exc.strerror or exc})", file=sys.stderr)
        return 2
    ml_bin = os.path.dirname(os.path.abspath(args.monailabel_python))
    monailabel = os.path.join(ml_bin, "monailabel")
    # the `monailabel` launcher runs `python -m monailabel.main`: its environment must come first on PATH
    env = dict(os.environ, PATH=ml_bin + os.pathsep + os.environ.get("PATH", ""), VIRTUAL_ENV=os.path.dirname(ml_bin))

    studies, names = make_studies(args.work)
    log(f"studies: {len(names)} 4-channel NIfTI in {studies}")

    apps = os.path.join(args.work, "apps")
    subprocess.run(
        [monailabel, "apps", "--download", "--name", "monaibundle", "--output", apps],
        check=True,
        stdout=subprocess.DEVNULL,
        timeout=300,
        env=env,
    )
    app = os.path.join(apps, "monaibundle")
    bundle_dir = os.path.join(app, "model", MODEL)
    shutil.copytree(BUNDLE, bundle_dir, ignore=shutil.ignore_patterns("models", "eval", "runs", "outputs"))
    os.makedirs(os.path.join(bundle_dir, "models"))
    patch_configs(bundle_dir)
    log("training a small model.pt (main environment)")
    train_small_model(bundle_dir, studies, names)
    reference = bundle_inference(bundle_dir, os.path.join(studies, f"{names[1]}.nii.gz"), args.work)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server_log = open(os.path.join(args.work, "server.log"), "w")
    cmd = [
        monailabel,
        "start_server",
        "--app",
        app,
        "--studies",
        studies,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--conf",
        "models",
        MODEL,
        "--conf",
        "zoo_source",
        "github",
        "--conf",
        "sam2",
        "false",
    ]
    server = subprocess.Popen(cmd, stdout=server_log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    log(f"server PID {server.pid} on {url}")
    try:
        deadline = time.time() + args.timeout
        info = None
        while time.time() < deadline:
            if server.poll() is not None:
                raise RuntimeError(f"server exited with {server.returncode}; see {server_log.name}")
            try:
                info = json.loads(http("GET", f"{url}/info/", timeout=10)[2])
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(3)
        if info is None:
            raise RuntimeError("server did not answer /info/ in time")
        model = info["models"][MODEL]
        labels = {k.lower(): int(v) for k, v in model["labels"].items()}
        log(f"/info/: {MODEL} labels {labels}")
        assert set(labels.values()) == {1, 2, 4}, labels
        assert labels["enhancing tumour"] == 4, labels

        study = names[1]  # T1 channel all zero: a missing modality
        status, headers, body = http("POST", f"{url}/infer/{MODEL}?image={study}&output=image", body=b"", timeout=600)
        out = os.path.join(args.work, "infer_result.nii.gz")
        with open(out, "wb") as f:
            f.write(body)
        pred, ref = nib.load(out), nib.load(os.path.join(studies, f"{study}.nii.gz"))
        values = set(np.unique(np.asarray(pred.dataobj)).tolist())
        log(f"/infer/: shape {pred.shape}, values {sorted(values)}")
        assert pred.shape == ref.shape[:3], (pred.shape, ref.shape)
        assert np.allclose(pred.affine, ref.affine, atol=1e-4), (pred.affine, ref.affine)
        assert values <= {0, 1, 2, 4}, values
        mine = np.asarray(nib.load(reference).dataobj)
        agree = float((np.asarray(pred.dataobj) == mine).mean())
        log(f"/infer/ agrees with the bundle's own inference on {agree * 100:.2f} % of voxels")
        assert agree > 0.999, "MONAI Label's output differs from the bundle's: were the weights loaded?"
        assert len(set(np.unique(mine).tolist())) > 1, "the trained model segments nothing: the check would be void"

        status, headers, body = http("POST", f"{url}/infer/{MODEL}?image={study}&output=json", body=b"", timeout=600)
        check_report(json.loads(body))

        request = {"max_epochs": 1, "val_split": 0.25, "device": "cpu", "multi_gpu": False, "pretrained": True}
        http(
            "POST",
            f"{url}/train/{MODEL}?run_sync=false",
            body=json.dumps(request).encode(),
            headers={"Content-Type": "application/json"},
            timeout=60,
        )
        deadline = time.time() + args.timeout
        state = None
        while time.time() < deadline:
            time.sleep(5)
            state = json.loads(http("GET", f"{url}/train/?check_if_running=false", timeout=30)[2])
            if state.get("status") not in ("RUNNING", "SUBMITTED"):
                break
        log(f"/train/: {state.get('status') if state else None}")
        assert state and state.get("status") == "DONE", state
        with open(server_log.name) as f:
            text = f.read()
        assert "Epoch: 1/1" in text or "Epoch[1]" in text, "no training epoch in the server log"
        log("all checks passed")
        return 0
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        server_log.close()
        log(f"server {server.pid} stopped")


if __name__ == "__main__":
    sys.exit(main())
