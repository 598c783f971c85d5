"""Nothing lost: a training run killed with SIGKILL mid-epoch and resumed with --resume_train ends exactly as the
uninterrupted run (every tensor of its checkpoints, its metrics, its test results), with or without loader
workers; a kill while a checkpoint is being written leaves a loadable file; non-finite losses or weights stop
the run and keep the last good checkpoint. Every run here starts from seed 0 in its own process, so the
equalities also show that the seed alone decides a run on the CPU; another seed gives another run."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from training.checkpoints import is_measurement
from conftest import REPO_ROOT, run_folders, run_script, tiny_training_args, train_in_process

RUN_FLAGS = ("--epochs_num", "2", "--iterations_per_epoch", "4", "--checkpoint_every", "2", "--image_size", "32",
             "--test_image_size", "32", "--val_every", "3")  # validations at steps 0, 3, 4 (epoch end), 6, 8


def training_args(dataset, folder, *extra):
    return tiny_training_args(dataset, folder, *RUN_FLAGS, *extra)


def start_and_kill(args, kill_after):
    """Runs train.py and kills it with SIGKILL as soon as it prints kill_after (train.py logs 'Checkpoint saved:
    epoch E, iteration I' right after writing one); returns its run folder."""
    process = subprocess.Popen([sys.executable, os.path.join(REPO_ROOT, "train.py"), *map(str, args)], cwd=REPO_ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    output = []
    with process.stdout:
        for line in process.stdout:
            output.append(line)
            if kill_after in line:
                process.kill()
                break
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, f"train.py ended before '{kill_after}':\n{''.join(output)[-5000:]}"
    return next(line.split("The outputs are being saved in ")[1].strip() for line in output
                if "The outputs are being saved in " in line)


def load(folder, name):
    return torch.load(os.path.join(folder, name), map_location="cpu", weights_only=False)


def assert_identical(expected, actual, where):
    """Same nested structure, same values, bit for bit; the run's flags and timings may differ."""
    if isinstance(expected, dict):
        keys = [k for k in expected if k != "args" and not is_measurement(str(k))]
        assert keys == [k for k in actual if k != "args" and not is_measurement(str(k))], where
        for key in keys:
            assert_identical(expected[key], actual[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(expected) == len(actual), where
        for i, (e, a) in enumerate(zip(expected, actual)):
            assert_identical(e, a, f"{where}[{i}]")
    elif torch.is_tensor(expected):
        assert torch.equal(expected, actual), f"{where} differs"
    elif isinstance(expected, np.ndarray):
        assert np.array_equal(expected, actual), f"{where} differs"
    else:
        assert expected == actual, f"{where}: {expected} != {actual}"


def metrics(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as file:
        return [{k: v for k, v in json.loads(line).items() if not is_measurement(k)} for line in file]


def assert_same_run(expected_folder, folder):
    for name in ("best_model.pth", "last_checkpoint.pth"):
        assert_identical(load(expected_folder, name), load(folder, name), name)
    assert [record["step"] for record in metrics(expected_folder)] == [0, 3, 4, 6, 8]
    assert metrics(folder) == metrics(expected_folder)
    with open(os.path.join(expected_folder, "test_results.json")) as expected, \
            open(os.path.join(folder, "test_results.json")) as actual:
        assert {**json.load(expected), "model": None} == {**json.load(actual), "model": None}


@pytest.fixture(scope="module")
def uninterrupted_run(synthetic_dataset, tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    return train_in_process(*training_args(synthetic_dataset, folder))


@pytest.fixture(scope="module")
def killed_with_workers(synthetic_dataset, tmp_path_factory):
    """A run with 2 loader workers killed in its first epoch, right after the checkpoint of iteration 2."""
    folder = tmp_path_factory.mktemp("killed_with_workers")
    args = training_args(synthetic_dataset, folder, "--num_workers", "2")
    return args, start_and_kill(args, "Checkpoint saved: epoch 0, iteration 2")


def test_killed_mid_epoch_and_resumed_ends_as_uninterrupted(uninterrupted_run, synthetic_dataset, tmp_path):
    """Killed in the second epoch: the resumed run must also restore the metrics history and the best model."""
    args = training_args(synthetic_dataset, tmp_path)
    killed_folder = start_and_kill(args, "Checkpoint saved: epoch 1, iteration 2")
    checkpoint = load(killed_folder, "last_checkpoint.pth")
    assert (checkpoint["epoch_num"], checkpoint["iteration"]) == (1, 2) and len(checkpoint["metrics_history"]) == 4
    resumed_folder = train_in_process(*args, "--resume_train", os.path.join(killed_folder, "last_checkpoint.pth"))
    assert resumed_folder != killed_folder
    assert_same_run(uninterrupted_run, resumed_folder)


def test_killed_with_loader_workers_and_resumed_ends_as_uninterrupted(uninterrupted_run, killed_with_workers):
    args, killed_folder = killed_with_workers
    checkpoint = load(killed_folder, "last_checkpoint.pth")
    assert (checkpoint["epoch_num"], checkpoint["iteration"]) == (0, 2)
    resumed_folder = train_in_process(*args, "--resume_train", os.path.join(killed_folder, "last_checkpoint.pth"))
    assert_same_run(uninterrupted_run, resumed_folder)


def test_another_seed_gives_another_run(killed_with_workers, tmp_path):
    args, seed_0_folder = killed_with_workers
    args = [str(tmp_path / "logs") if value.endswith("logs") else value for value in args]
    seed_1_folder = start_and_kill([*args, "--seed", "1"], "Checkpoint saved: epoch 0, iteration 2")
    seed_0, seed_1 = load(seed_0_folder, "last_checkpoint.pth"), load(seed_1_folder, "last_checkpoint.pth")
    assert seed_0["epoch_losses"] != seed_1["epoch_losses"]
    weights = [k for k, v in seed_0["model_state_dict"].items() if v.dim() > 1]  # not BatchNorm's ones and zeros
    assert not any(torch.equal(seed_0["model_state_dict"][k], seed_1["model_state_dict"][k]) for k in weights)


def test_resume_with_another_descriptor_size_names_the_shapes(uninterrupted_run, synthetic_dataset, tmp_path):
    result = run_script("train.py", *training_args(synthetic_dataset, tmp_path, "--fc_output_dim", "64"),
                        "--resume_train", os.path.join(uninterrupted_run, "last_checkpoint.pth"), check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 1 and "Traceback" not in output, output[-3000:]
    assert "--fc_output_dim 512 -> 64" in output  # the warning on the flags that changed
    assert "does not fit this model (--backbone, --aggregator, --fc_output_dim?)" in output
    assert "aggregation.3.weight: checkpoint (512, 512) vs model (64, 512)" in output


@pytest.mark.parametrize("flags, message, checkpoint_iteration", [
    (["--lr", "1e30"], "The loss became nan at epoch 0, iteration 2", 1),  # absurd weights after step 1
    (["--loss_scale", "1e30"], "The weights became non-finite at epoch 0, iteration 1", None),  # loss 1 finite
])
def test_non_finite_loss_or_weights_stop_and_keep_the_last_good_checkpoint(flags, message, checkpoint_iteration,
                                                                         synthetic_dataset, tmp_path):
    result = run_script("train.py", *tiny_training_args(synthetic_dataset, tmp_path, "--image_size", "32",
                                                        "--checkpoint_every", "1", "--log_every", "1", *flags),
                        check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 1 and "Traceback" not in output, output[-3000:]
    folder = run_folders(tmp_path)[-1]
    assert (f"ERROR: {message}: training stopped. The last good checkpoint, if any, is "
            f"{os.path.join(folder, 'last_checkpoint.pth')}") in output
    assert not os.path.exists(os.path.join(folder, "best_model.pth"))
    if checkpoint_iteration is None:
        assert not os.path.exists(os.path.join(folder, "last_checkpoint.pth"))
        return
    checkpoint = load(folder, "last_checkpoint.pth")
    assert (checkpoint["epoch_num"], checkpoint["iteration"]) == (0, checkpoint_iteration)
    assert all(torch.isfinite(v).all() for v in checkpoint["model_state_dict"].values() if v.is_floating_point())


WRITER = """
import sys
import torch
sys.path.insert(0, sys.argv[1])
from training import checkpoints
for version in range(1, 10 ** 6):
    checkpoints.atomic_torch_save({"version": version, "data": torch.full((2_000_000,), float(version))}, sys.argv[2])
    print(version, flush=True)
"""


def test_a_kill_while_a_checkpoint_is_written_leaves_a_loadable_one(tmp_path):
    """A process rewrites an 8 MB checkpoint in a loop and is killed at random moments: the file always loads,
    whole, as the last version the writer reported or the one it was writing."""
    path, rng = str(tmp_path / "last_checkpoint.pth"), random.Random(0)
    for _ in range(3):
        process = subprocess.Popen([sys.executable, "-c", WRITER, REPO_ROOT, path], stdout=subprocess.PIPE, text=True)
        printed = [int(process.stdout.readline())]  # the first version is written: from now on a kill can fall
        time.sleep(rng.uniform(0, 0.3))             # between two writes or in the middle of one
        process.kill()
        process.wait()
        printed += map(int, process.stdout.read().split())
        process.stdout.close()
        checkpoint = torch.load(path, weights_only=True)
        assert checkpoint["version"] in (printed[-1], printed[-1] + 1)
        assert torch.equal(checkpoint["data"], torch.full((2_000_000,), float(checkpoint["version"])))
    with open(tmp_path / "written_by_open", "w"):
        pass
    assert os.stat(path).st_mode & 0o777 == os.stat(tmp_path / "written_by_open").st_mode & 0o777  # as any file
