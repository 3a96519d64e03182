"""Plain vs Adv vs IMA nnU-Net on real CT / MR lesion volumes (not part of the tests).

The ``pyradiomics-bhklab==3.1.4`` source archive ships five real volumes with lesion masks
(``data/{brain1,brain2,breast1,lung1,lung2}_{image,label}.nrrd``). This script downloads the
archive from PyPI (pinned by sha256), builds an nnU-Net raw dataset from them (each volume
cropped in-plane to a box around its lesion, labels binarised: background / lesion), and runs
the same commands as ``nnunet-ima demo``: plan and preprocess (2D), ``nnunet-ima split``,
``nnUNetv2_train`` with ``nnUNetTrainerClean`` / ``nnUNetTrainerAdv`` / ``nnUNetTrainerIMA`` and
``nnunet-ima-eval``.

    python benchmarks/pyradiomics_benchmark.py --workdir runs/pyradiomics [--epochs 20]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import urllib.request

import numpy as np
import SimpleITK as sitk

ARCHIVE = "pyradiomics_bhklab-3.1.4.tar.gz"
URL = ("https://files.pythonhosted.org/packages/32/fa/f537d03512335d6f9ba4e1678679a845bc2e73c9d9c1"
       "ddbe666909e10c14/pyradiomics_bhklab-3.1.4.tar.gz")
SHA256 = "a44a087efc4ede91b5dfa5cf0de58ea3596bfaec1ef2484f278504b0a8fd5ffb"
CASES = ("brain1", "brain2", "breast1", "lung1", "lung2")
DATASET_ID, DATASET_NAME = 991, "Dataset991_PyradiomicsLesions"
TRAINERS = ("nnUNetTrainerClean", "nnUNetTrainerAdv", "nnUNetTrainerIMA")


def fetch_archive(folder: str) -> str:
    """Download the sdist once; refuse it unless its sha256 is the pinned one."""
    path = os.path.join(folder, ARCHIVE)
    if not os.path.isfile(path):
        os.makedirs(folder, exist_ok=True)
        urllib.request.urlretrieve(URL, path + ".part")
        os.replace(path + ".part", path)
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    if digest != SHA256:
        raise SystemExit(f"{path}: sha256 {digest} is not the pinned {SHA256}")
    return path


def crop_box(label: np.ndarray, size: int, slice_margin: int):
    """``(z, y, x)`` slices of a box centred on the lesion: ``size`` in-plane, lesion +- margin."""
    zs, ys, xs = np.nonzero(label)
    z0, z1 = max(zs.min() - slice_margin, 0), min(zs.max() + slice_margin + 1, label.shape[0])
    boxes = []
    for c, extent in ((int(ys.mean()), label.shape[1]), (int(xs.mean()), label.shape[2])):
        start = int(np.clip(c - size // 2, 0, max(extent - size, 0)))
        boxes.append(slice(start, min(start + size, extent)))
    return (slice(z0, z1), *boxes)


def build_raw_dataset(archive: str, raw_root: str, size: int = 128, slice_margin: int = 4) -> str:
    """Write the five lesion volumes as an nnU-Net raw dataset; returns its folder."""
    folder = os.path.join(raw_root, DATASET_NAME)
    os.makedirs(os.path.join(folder, "imagesTr"), exist_ok=True)
    os.makedirs(os.path.join(folder, "labelsTr"), exist_ok=True)
    with tarfile.open(archive) as tar:
        for case in CASES:
            arrays = {}
            for kind in ("image", "label"):
                member = tar.getmember(f"pyradiomics_bhklab-3.1.4/data/{case}_{kind}.nrrd")
                tmp = os.path.join(folder, f"_{case}_{kind}.nrrd")
                with open(tmp, "wb") as f:
                    f.write(tar.extractfile(member).read())
                arrays[kind] = sitk.ReadImage(tmp)
                os.remove(tmp)
            image, label = arrays["image"], arrays["label"]
            lab = (sitk.GetArrayFromImage(label) > 0).astype(np.uint8)
            img = sitk.GetArrayFromImage(image).astype(np.float32)
            box = crop_box(lab, size, slice_margin)
            for array, name, sub in ((img[box], f"{case}_0000.nii.gz", "imagesTr"),
                                     (lab[box], f"{case}.nii.gz", "labelsTr")):
                out = sitk.GetImageFromArray(array)
                out.SetSpacing(image.GetSpacing())
                sitk.WriteImage(out, os.path.join(folder, sub, name), useCompression=True)
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump({"channel_names": {"0": "image"}, "labels": {"background": 0, "lesion": 1},
                   "numTraining": len(CASES), "file_ending": ".nii.gz",
                   "name": "PyradiomicsLesions",
                   "description": "pyradiomics test volumes (brain MR, breast MR, lung CT) "
                                  "cropped around their lesions"}, f, indent=2)
    return folder


def run(command, env, log):
    print("$ " + " ".join(command), flush=True)
    with open(log, "w") as f:
        subprocess.run(command, env=env, stdout=f, stderr=subprocess.STDOUT, check=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="runs/pyradiomics")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--pgd-steps", type=int, default=5)
    p.add_argument("--eps", type=float, default=8.0, help="Adv eps; IMA eps_max is twice it")
    p.add_argument("--noise", type=float, nargs="+", default=[0, 4, 8, 16])
    p.add_argument("--eval-steps", type=int, default=100)
    args = p.parse_args()
    work = os.path.abspath(args.workdir)
    folders = {k: os.path.join(work, k) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for folder in folders.values():
        os.makedirs(folder, exist_ok=True)
    bin_dir = os.path.dirname(sys.executable)
    env = dict(os.environ, **folders, nnUNet_def_n_proc="1")
    env.pop("nnUNet_n_proc_DA", None)
    env["nnUNet_extTrainer"] = subprocess.run([os.path.join(bin_dir, "nnunet-ima"), "trainer-dir"],
                                              capture_output=True, text=True, check=True).stdout.strip()
    logs = os.path.join(work, "logs")
    os.makedirs(logs, exist_ok=True)

    build_raw_dataset(fetch_archive(work), folders["nnUNet_raw"])
    run([os.path.join(bin_dir, "nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", "2d",
         "-npfp", "1", "-np", "1", "--verify_dataset_integrity"], env, os.path.join(logs, "plan.log"))
    run([os.path.join(bin_dir, "nnunet-ima"), "split", "-d", str(DATASET_ID), "--test", "1",
         "--val", "1", "--seed", "0", "--overwrite"], env, os.path.join(logs, "split.log"))
    schedule = {"num_epochs": args.epochs, "num_iterations_per_epoch": args.iterations,
                "num_val_iterations_per_epoch": 2, "pgd_steps": args.pgd_steps, "seed": 0,
                "adv_eps": args.eps, "eps_max": 2 * args.eps}
    config = os.path.join(work, "schedule.json")
    with open(config, "w") as f:
        json.dump(schedule, f)
    for trainer in TRAINERS:
        if os.path.isfile(os.path.join(folders["nnUNet_results"], DATASET_NAME,
                                       f"{trainer}__nnUNetPlans__2d", "fold_0", "checkpoint_final.pth")):
            continue
        run([os.path.join(bin_dir, "nnUNetv2_train"), str(DATASET_ID), "2d", "0", "-tr", trainer,
             "-device", "cpu"], dict(env, NNUNET_IMA_CONFIG=config, nnUNet_n_proc_DA="0"),
            os.path.join(logs, f"train_{trainer}.log"))
    command = [os.path.join(bin_dir, "nnunet-ima-eval"), "-d", str(DATASET_ID), "-tr", *TRAINERS,
               "--noise", *[f"{n:g}" for n in args.noise], "--steps", str(args.eval_steps),
               "--device", "cpu", "-o", os.path.join(work, "robustness"), "--no-progress"]
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, env=env, check=True)


if __name__ == "__main__":
    main()
