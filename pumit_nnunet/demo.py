"""``pumit-nnunet demo``: the whole nnU-Net pipeline with PUMIT on real CT scans, on a CPU, in minutes.

It obtains two real chest CTs with expert nodule ROIs (the ``data/`` folder of the pyradiomics 3.0.1 source
distribution on PyPI, fetched with pip) unless ``--data`` names a folder, builds a small nnU-Net raw dataset
(crops around the ROIs; scan ``lung2`` is held out for testing), then runs the stock commands:
``nnUNetv2_plan_and_preprocess``, ``nnUNetv2_train ... -tr PumitTrainer_T_demo``, ``nnUNetv2_predict``, and
evaluates the held-out prediction (Dice, surface distances). Steps whose outputs exist are skipped.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
from pathlib import Path

__all__ = ["register", "obtain_pyradiomics_data", "find_cases"]

PYRADIOMICS_SDIST = "pyradiomics==3.0.1"
DEMO_FILES = ("lung1_image.nrrd", "lung1_label.nrrd", "lung2_image.nrrd", "lung2_label.nrrd")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="end-to-end demo on real CT scans: plan, preprocess, train, predict, evaluate",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="folder with lung1/lung2 scans (pyradiomics data/ or an nnU-Net raw "
                        "dataset with imagesTr/labelsTr); default: fetch the pyradiomics 3.0.1 sdist from PyPI")
    parser.add_argument("--work", type=Path, default=Path("pumit_demo_work"), help="working folder (default: %(default)s)")
    parser.add_argument("--trainer", default="PumitTrainer_T_demo", help="PUMIT trainer (default: %(default)s)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "mps"))
    parser.add_argument("--dataset-id", type=int, default=990)
    parser.set_defaults(func=_run)


def obtain_pyradiomics_data(cache: Path) -> Path:
    """Download the pyradiomics 3.0.1 sdist with pip (PyPI) and extract its real demo scans; cached."""
    target = cache / "pyradiomics-data"
    if all((target / f).is_file() for f in DEMO_FILES):
        return target
    downloads = cache / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    print(f"fetching {PYRADIOMICS_SDIST} (source distribution, ~34 MB) from PyPI ...", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation",
                    PYRADIOMICS_SDIST, "-d", str(downloads)], check=True)
    archive = next(downloads.glob("pyradiomics-3.0.1.tar.gz"), None)
    if archive is None:
        raise FileNotFoundError(f"pip did not leave pyradiomics-3.0.1.tar.gz in {downloads}")
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        for name in DEMO_FILES:
            member = tar.getmember(f"pyradiomics-3.0.1/data/{name}")
            source = tar.extractfile(member)
            if source is None:
                raise ValueError(f"{archive}: {member.name} is not a regular file")
            tmp = target / f".{name}.part"
            tmp.write_bytes(source.read())
            os.replace(tmp, target / name)
    return target


def find_cases(folder: Path) -> dict[str, tuple[Path, Path]]:
    """``{lung1: (image, label), lung2: ...}`` from a pyradiomics ``data/`` folder or an nnU-Net raw dataset."""
    cases = {}
    for name in ("lung1", "lung2"):
        candidates = [(folder / f"{name}_image.nrrd", folder / f"{name}_label.nrrd"),
                      (folder / "imagesTr" / f"{name}_0000.nii.gz", folder / "labelsTr" / f"{name}.nii.gz")]
        found = next((pair for pair in candidates if all(p.is_file() for p in pair)), None)
        if found is None:
            raise FileNotFoundError(f"{folder}: no {name} scan (expected {name}_image.nrrd + {name}_label.nrrd, or "
                                    f"imagesTr/{name}_0000.nii.gz + labelsTr/{name}.nii.gz)")
        cases[name] = found
    return cases


def _build_dataset(cases: dict[str, tuple[Path, Path]], raw: Path, dataset_id: int) -> Path:
    import SimpleITK as sitk

    from pumit_nnunet.io import write_image_atomic
    from pumit_nnunet.nnunet.demo_data import SourceCase, crop_around_label, write_raw_dataset

    image, label = cases["lung1"]
    train = [SourceCase(f"lung1{s}", image, label, shift) for s, shift in (("", (0, 0, 0)), ("b", (2, 12, -10)), ("c", (-2, -8, 14)))]
    splits = [{"train": ["lung1", "lung1b"], "val": ["lung1c"]}]
    folder = write_raw_dataset(train, raw, dataset_id, "PumitDemoLungCT", "CT", {"background": 0, "nodule": 1}, (16, 96, 96), splits)
    # the held-out scan, never seen in training
    for sub in ("imagesTs", "labelsTs"):
        (folder / sub).mkdir(exist_ok=True)
    test_image, test_label = crop_around_label(sitk.ReadImage(str(cases["lung2"][0])), sitk.ReadImage(str(cases["lung2"][1])), (20, 112, 112))
    test_label = sitk.Cast(test_label, sitk.sitkUInt8)
    write_image_atomic(test_image, folder / "imagesTs" / "lung2_0000.nii.gz")
    write_image_atomic(test_label, folder / "labelsTs" / "lung2.nii.gz")
    return folder


def _step(title: str, command: list[str], env: dict[str, str], done: bool) -> None:
    print(f"\n=== {title}\n$ {' '.join(command)}", flush=True)
    if done:
        print("(already done: skipped)")
        return
    subprocess.run(command, env=env, check=True)


def _run(args: argparse.Namespace) -> int:
    work = args.work.resolve()
    data = args.data.resolve() if args.data else obtain_pyradiomics_data(work / "cache")
    cases = find_cases(data)
    env = dict(os.environ, nnUNet_raw=str(work / "nnUNet_raw"), nnUNet_preprocessed=str(work / "nnUNet_preprocessed"),
               nnUNet_results=str(work / "nnUNet_results"), nnUNet_def_n_proc=os.environ.get("nnUNet_def_n_proc", "2"))
    if env.get("nnUNet_n_proc_DA") == "0":  # nnU-Net 2.8.1's planner crashes on 0 (torch.set_num_threads(0))
        del env["nnUNet_n_proc_DA"]
    folder = _build_dataset(cases, work / "nnUNet_raw", args.dataset_id)
    name = folder.name
    plans = work / "nnUNet_preprocessed" / name / "nnUNetPlans.json"
    _step("plan and preprocess (stock nnU-Net)", ["nnUNetv2_plan_and_preprocess", "-d", str(args.dataset_id), "-c", "3d_fullres", "-np", "2"], env, plans.is_file())
    results = work / "nnUNet_results" / name / f"{args.trainer}__nnUNetPlans__3d_fullres"
    train_env = dict(env, nnUNet_n_proc_DA=os.environ.get("nnUNet_n_proc_DA", "0" if args.device == "cpu" else "4"))
    _step("train (stock nnUNetv2_train with the PUMIT trainer)",
          ["nnUNetv2_train", str(args.dataset_id), "3d_fullres", "0", "-tr", args.trainer, "-device", args.device],
          train_env, (results / "fold_0" / "checkpoint_final.pth").is_file())
    prediction = work / "predictions"
    _step("predict the held-out scan (stock nnUNetv2_predict)",
          ["nnUNetv2_predict", "-i", str(folder / "imagesTs"), "-o", str(prediction), "-d", str(args.dataset_id), "-c", "3d_fullres",
           "-tr", args.trainer, "-f", "0", "-device", args.device], env, (prediction / "lung2.nii.gz").is_file())
    from pumit_nnunet.evaluation.evaluate import EvaluationConfig, evaluate_folders, format_summary_table, write_results

    result = evaluate_folders(prediction, folder / "labelsTs", EvaluationConfig(labels=(1,), label_names={1: "nodule"}), progress=False)
    write_results(result, work / "evaluation")
    print("\n=== held-out scan lung2 (never seen in training)\n" + format_summary_table(result))
    print(f"\nDice (nodule, held-out): {result.mean[1]['dice']:.3f}")
    print(f"training curves: {results / 'fold_0' / 'progress.png'}\nmetrics: {work / 'evaluation' / 'metrics.json'}")
    print("A few CPU minutes from scratch on three crops of one scan is a pipeline check, not a benchmark: "
          "fine-tune from pre-trained weights (-pretrained_weights) on real data for real numbers.")
    return 0
