"""train.py of this project and of the original CosPlace (a checkout given by path), run one after the other on the
same data with the same flags, each timed from its own logs: training, validation, test, whole run.

    python benchmarks/bench.py --original /path/to/CosPlace --dataset_folder /path/to/dataset [--side_by_side_iterations 100]

Both train ResNet-18 from a random initialisation (the original's ImageNet download is switched off by
--pretrained none here and by a weights=None patch there: without internet it cannot download), every layer, at
--train_image_size, batch --batch_size, one group, one epoch, seed 0, --num_workers loader workers, on the CPU
(the original's augmentation on the CPU too), and validate and test at the images' native size. The dataset folder
holds train/, val/ and test/ (each with database/ and queries/); the original reads its test queries from
queries_v1/, so its test folder is a temporary one with links. The original needs its own requirements (opencv,
scikit-image): --original_python names a Python that has them. Each figure comes from the run that made it: the
log folders are printed."""

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)")


def log_times(path, *markers):
    """The time of the first line of the log at path that holds each marker (seconds since the epoch)."""
    with open(path) as file:
        lines = file.readlines()
    times = []
    for marker in markers:
        line = next((line for line in lines if marker in line and LOG_TIME.match(line)), None)
        if line is None:
            raise SystemExit(f"{path} has no line with {marker!r}: did the run fail? See the log")
        times.append(datetime.strptime(LOG_TIME.match(line).group(1), "%Y-%m-%d %H:%M:%S").timestamp())
    return times


def run(command, cwd):
    start = time.time()
    completed = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if completed.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}")
    return time.time() - start


def newest_folder(folder):
    return max((os.path.join(folder, name) for name in os.listdir(folder)), key=os.path.getmtime)


def run_original(config, work_folder):
    """The original's train.py; its figures from the timestamps of its debug.log (1 s resolution)."""
    test_folder = os.path.join(work_folder, "test_v1")
    os.makedirs(test_folder)
    os.symlink(os.path.join(config.dataset_folder, "test", "database"), os.path.join(test_folder, "database"))
    os.symlink(os.path.join(config.dataset_folder, "test", "queries"), os.path.join(test_folder, "queries_v1"))
    save_dir = f"side_by_side_{os.getpid()}"
    seconds = run([config.original_python, "train.py", "--train_set_folder",
                   os.path.join(config.dataset_folder, "train"), "--val_set_folder",
                   os.path.join(config.dataset_folder, "val"), "--test_set_folder", test_folder, "--groups_num", "1",
                   "--epochs_num", "1", "--iterations_per_epoch", str(config.iterations), "--batch_size",
                   str(config.batch_size), "--image_size", str(config.train_image_size), "--train_all_layers",
                   "--num_workers", str(config.num_workers), "--device", "cpu", "--augmentation_device", "cpu",
                   "--seed", "0", "--save_dir", save_dir], cwd=config.original)
    folder = newest_folder(os.path.join(config.original, "logs", save_dir))
    log = os.path.join(folder, "debug.log")
    start, trained, validated, testing, finished = log_times(
        log, "Start training", "Epoch 00 in", ", < val", "Now testing", "Experiment finished")
    with open(log) as file:
        loss = float(re.search(r"Epoch 00 in [\d:]+, loss = ([\d.]+)", file.read()).group(1))
    return {"train_s": trained - start, "validation_s": validated - trained, "test_s": finished - testing,
            "process_s": seconds, "loss": loss, "log": log}


def run_ours(config, work_folder, amp="none"):
    """This project's train.py (with --amp and --eval_amp amp); training and validation times from its metrics.jsonl,
    the test's from its log."""
    logs = os.path.join(REPO_ROOT, "logs")
    seconds = run([sys.executable, "train.py", "--dataset_folder", config.dataset_folder, "--groups_num", "1",
                   "--epochs_num", "1", "--iterations_per_epoch", str(config.iterations), "--batch_size",
                   str(config.batch_size), "--image_size", str(config.train_image_size), "--train_all_layers",
                   "--pretrained", "none", "--num_workers", str(config.num_workers), "--device", "cpu", "--seed", "0",
                   "--logs_root", logs, "--save_dir", f"side_by_side_{amp}", "--cache_folder",
                   os.path.join(work_folder, "cache"), "--amp", amp, "--eval_amp", amp], cwd=REPO_ROOT)
    folder = newest_folder(os.path.join(logs, f"side_by_side_{amp}"))
    with open(os.path.join(folder, "metrics.jsonl")) as file:
        (record,) = [json.loads(line) for line in file]
    testing, finished = log_times(os.path.join(folder, "info.log"), "Testing on", "Experiment finished")
    return {"train_s": record["train_time_s"], "validation_s": record["validation_time_s"],
            "test_s": finished - testing, "process_s": seconds, "loss": record["epoch_loss"],
            "log": os.path.join(folder, "info.log")}


def compare(config):
    """Runs the original, ours in fp32 (the default) and ours in bf16 autocast (--amp bf16 --eval_amp bf16: where the
    CPU has bfloat16 units, core/cpu.py), prints one table; returns the figures."""
    with tempfile.TemporaryDirectory(prefix="side_by_side_") as work_folder:
        original = run_original(config, work_folder)
        print(f"  original CosPlace: done ({original['log']})", flush=True)
        ours = {amp: run_ours(config, work_folder, amp) for amp in ("none", "bf16")}
        print(f"  this project: done ({', '.join(run['log'] for run in ours.values())})", flush=True)
    lines = [f"ResNet-18 random init, {config.train_image_size} px, batch {config.batch_size}, all layers, "
             f"{config.iterations} iterations, seed 0, {config.num_workers} workers, CPU; {config.dataset_folder}",
             f"{'':<24}{'original':>12}{'ours fp32':>12}{'speed-up':>10}{'ours bf16':>12}{'speed-up':>10}"]
    for key, label in (("train_s", "training, s"), ("validation_s", "validation, s"), ("test_s", "test, s"),
                       ("process_s", "whole process, s")):
        lines.append(f"{label:<24}{original[key]:>12.1f}" + "".join(
            f"{run[key]:>12.1f}{original[key] / run[key]:>9.2f}x" for run in ours.values()))
    lines.append(f"{'epoch loss':<24}{original['loss']:>12.4f}" + "".join(f"{run['loss']:>12.4f}{'':>10}"
                                                                         for run in ours.values()))
    print("\n".join(lines))
    return {"original": original, "ours": ours["none"], "ours_bf16": ours["bf16"], "table": "\n".join(lines)}
