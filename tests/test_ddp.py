"""Multi-process training (DDP through torchrun), on the CPU with gloo: two processes train the same
weights on different images with their own augmentations, only rank 0 writes, and what it writes loads in a
single process."""

import json
import os
import subprocess
import sys

import numpy as np
import torch

import checkpoints
import eval as eval_script
import parser
from conftest import REPO_ROOT, run_folders, run_script, tiny_training_args
from datasets.train_dataset import ClassBatchSampler
from model import network


def test_ranks_take_disjoint_slices_of_the_global_batch():
    sizes = [3] * 40
    single = ClassBatchSampler(sizes, 8, seed=0, epoch=1)
    ranks = [ClassBatchSampler(sizes, 4, seed=0, epoch=1, rank=r, world_size=2) for r in range(2)]
    for iteration in range(7):  # across passes over the classes too (5 batches per pass)
        classes = [[c for c, _ in sampler.batch(iteration)] for sampler in ranks]
        assert not set(classes[0]) & set(classes[1])
        assert sorted(classes[0] + classes[1]) == sorted(c for c, _ in single.batch(iteration))


def test_torchrun_two_processes_on_cpu(synthetic_dataset, tmp_path):
    args = tiny_training_args(synthetic_dataset, tmp_path, "--batch_size", "4")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             os.path.join(REPO_ROOT, "train.py"), *args], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, f"torchrun failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    folders = run_folders(tmp_path)
    assert len(folders) == 1  # only rank 0 writes
    folder = folders[0]
    with open(os.path.join(folder, "args.json")) as file:
        assert json.load(file)["world_size"] == 2
    with open(os.path.join(folder, "info.log")) as file:
        log = file.read()
    assert "the weights (model, head) of the 2 processes are identical" in log
    assert "Experiment finished" in log
    # each process drew its own augmentations, and the checkpoint keeps every process's RNG states to resume them
    states = torch.load(os.path.join(folder, "last_checkpoint.pth"), weights_only=False)["rng_states"]
    assert len(states) == 2 and not torch.equal(states[0]["torch"], states[1]["torch"])
    # a single process can continue it, and says that its batches differ from the 2-process run's
    run_script("train.py", *tiny_training_args(synthetic_dataset, tmp_path, "--batch_size", "4", "--epochs_num", "2",
                                               "--resume_train", os.path.join(folder, "last_checkpoint.pth")))
    with open(os.path.join(run_folders(tmp_path)[-1], "info.log")) as file:
        log = file.read()
    assert "written by a run of 2 processes, this one has 1" in log and "Experiment finished" in log
    # what rank 0 wrote loads in a single process, and evaluates
    model_args = parser.parse_arguments("eval", argv=["--dataset_folder", synthetic_dataset,
                                                                 "--pretrained", "none"])
    for name in ("best_model.pth", "last_checkpoint.pth"):
        checkpoints.load_model_weights(network.build_model(model_args), os.path.join(folder, name))
    results = eval_script.main(["--dataset_folder", synthetic_dataset, "--pretrained", "none", "--num_workers", "0",
                                "--device", "cpu", "--resume_model", os.path.join(folder, "best_model.pth"),
                                "--logs_root", str(tmp_path / "eval_logs")])
    with open(os.path.join(folder, "test_results.json")) as file:
        recalls_during_training = json.load(file)
    recalls = results["test_sets"][os.path.join(synthetic_dataset, "test")]
    assert np.allclose([recalls[k] for k in ("R@1", "R@5")],
                       [recalls_during_training[k] for k in ("R@1", "R@5")])
