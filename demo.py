"""The offline demo: generates the synthetic dataset, evaluates the untrained network, trains it with CosPlace,
evaluates it again and prints the R@1/R@5 table. Needs no dataset and no internet (random initialisation).

    python demo.py                       # about 3 minutes on 2 CPU cores
    python demo.py --epochs_num 1        # quicker, smaller gain
"""

import argparse
import glob
import json
import os
import subprocess
import sys

from datasets.synthetic import generate_dataset

PROJECT_ROOT = os.path.dirname(os.path.abspath(__file__))
DEMO_DATASET_ARGS = dict(train_places=150, val_places=50, test_places=50, images_per_train_place=10, view_size=64,
                         seed=0)


def ensure_dataset(folder):
    """Generates the dataset once; a marker file written last tells a complete dataset from an interrupted one."""
    marker = os.path.join(folder, "generated_with.json")
    if os.path.exists(marker):
        with open(marker) as file:
            if json.load(file) == DEMO_DATASET_ARGS:
                return folder
    if os.path.isdir(folder) and os.listdir(folder):
        raise SystemExit(f"{folder} exists but is not a complete demo dataset: remove it, or pass another --data")
    print(f"Generating the synthetic dataset in {folder} ...")
    generate_dataset(folder, **DEMO_DATASET_ARGS)
    with open(marker, "w") as file:
        json.dump(DEMO_DATASET_ARGS, file)
    return folder


def run(script, arguments):
    """Runs train.py / eval.py as a user would, in a subprocess."""
    command = [sys.executable, os.path.join(PROJECT_ROOT, script), *map(str, arguments)]
    print("\n$ " + " ".join(command[1:]), flush=True)
    subprocess.run(command, cwd=PROJECT_ROOT, check=True)


def newest_run(logs_root, save_dir):
    return max(glob.glob(os.path.join(logs_root, save_dir, "*")), key=os.path.getmtime)


def evaluate(dataset, common, logs_root, save_dir, resume_model=None):
    arguments = ["--test_set_folder", os.path.join(dataset, "val"), os.path.join(dataset, "test"),
                 "--save_dir", save_dir, *common]
    if resume_model:
        arguments += ["--resume_model", resume_model]
    run("eval.py", arguments)
    with open(os.path.join(newest_run(logs_root, save_dir), "results.json")) as file:
        return [recalls for recalls in json.load(file)["test_sets"].values()]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.path.join(PROJECT_ROOT, "data", "synthetic_demo"))
    parser.add_argument("--logs_root", default=os.path.join(PROJECT_ROOT, "logs"))
    parser.add_argument("--epochs_num", type=int, default=3)
    parser.add_argument("--iterations_per_epoch", type=int, default=200)
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    dataset = ensure_dataset(args.data)
    common = ["--backbone", "resnet18", "--pretrained", "none", "--num_workers", args.num_workers, "--device",
              args.device, "--logs_root", args.logs_root, "--infer_batch_size", 32, "--seed", 0]
    untrained = evaluate(dataset, common, args.logs_root, "demo_untrained")
    run("train.py", ["--dataset_folder", dataset, "--groups_num", 1, "--epochs_num", args.epochs_num,
                     "--iterations_per_epoch", args.iterations_per_epoch, "--batch_size", 32, "--image_size", 64,
                     # From a random initialisation every layer must learn, and faster than from ImageNet weights
                     "--train_all_layers", "--lr", 0.001,
                     "--save_dir", "demo_train", "--num_preds_to_save", 3, "--save_only_wrong_preds", *common])
    train_folder = newest_run(args.logs_root, "demo_train")
    trained = evaluate(dataset, common, args.logs_root, "demo_trained", os.path.join(train_folder, "best_model.pth"))

    print("\nResNet-18 + GeM from random initialisation, synthetic dataset (R@1 / R@5):")
    print(f"{'':<28}{'val':>16}{'test':>16}")
    for name, results in (("untrained", untrained), ("trained (CosPlace)", trained)):
        cells = "".join(f"{r['R@1']:>9.1f} /{r['R@5']:>5.1f}" for r in results)
        print(f"{name:<28}{cells}")
    print(f"\nTraining logs, checkpoints and wrong predictions: {train_folder}")


if __name__ == "__main__":
    main()
