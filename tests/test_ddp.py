"""Multi-process training (DDP through torchrun), on the CPU with gloo: two processes train the same
weights on different images with their own augmentations, only rank 0 writes, and what it writes loads in a
single process; validation is extracted in shares and gives the recalls of one process; a NaN on one rank stops
every rank."""

import datetime
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from training import checkpoints
from core import distributed
import eval as eval_script
import parser
from conftest import REPO_ROOT, recalls_with_flags, run_folders, run_script, tiny_training_args
from datasets.test_dataset import TestDataset
from datasets.train_dataset import ClassBatchSampler
from model import network

WORLD_SIZE = 3  # uneven shares: the 36 images of the validation set, and 5 rows gathered below


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
        checkpoints.load_model_weights(network.GeoLocalizationNet(**parser.model_options(model_args)), os.path.join(folder, name))
    results = eval_script.main(["--dataset_folder", synthetic_dataset, "--pretrained", "none", "--num_workers", "0",
                                "--device", "cpu", "--resume_model", os.path.join(folder, "best_model.pth"),
                                "--logs_root", str(tmp_path / "eval_logs")])
    with open(os.path.join(folder, "test_results.json")) as file:
        recalls_during_training = json.load(file)
    recalls = results["test_sets"][os.path.join(synthetic_dataset, "test")]
    assert np.allclose([recalls[k] for k in ("R@1", "R@5")],
                       [recalls_during_training[k] for k in ("R@1", "R@5")])


def eval_args(dataset_folder):
    args = parser.parse_arguments("eval", argv=["--dataset_folder", dataset_folder, "--pretrained", "none",
                                                "--backbone", "resnet18", "--fc_output_dim", "32",
                                                "--test_image_size", "48", "--infer_batch_size", "5"])
    args.device, args.num_workers = "cpu", 0
    return args


def seeded_model(args):
    torch.manual_seed(0)
    return network.GeoLocalizationNet(**parser.model_options(args))


def rank_process(rank, dataset_folder, out):
    """One of WORLD_SIZE gloo processes: sharded validation, uneven gathers, losses averaged, a NaN on rank 1 only.
    Writes what it got to out/rank<rank>.* (spawned: a module-level function)."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank,
                                         world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=120))
    args = eval_args(dataset_folder)
    val_ds = TestDataset(os.path.join(dataset_folder, "val"), image_size=48)
    tested = recalls_with_flags(args, val_ds, seeded_model(args), world_size=WORLD_SIZE, rank=rank)
    recalls, descriptors = tested.recalls, tested.descriptors
    rows = np.arange(rank, 5, WORLD_SIZE)  # ranks 0 and 1 give two rows, rank 2 one
    local = np.full((5, 3), np.nan, dtype=np.float32)  # this process's rows only
    local[rows] = rows[:, None] * np.ones((1, 3), np.float32)
    gathered_values = distributed.all_gather_rows(local, rows, 5, WORLD_SIZE, chunk_rows=1)  # two rounds of gathers
    averaged = distributed.mean_over_processes([{"loss": float(rank), "ssl": 1.0}, {"loss": 2.0 * rank, "ssl": 3.0}],
                                               WORLD_SIZE)
    losses = [{"loss": 1.0}, {"loss": math.nan if rank == 1 else 2.0}, {"loss": 3.0}]
    try:
        checkpoints.check_finite_losses([r["loss"] for r in distributed.mean_over_processes(losses, WORLD_SIZE)],
                                        0, 9, "ckpt")
        stopped = "not stopped"
    except checkpoints.TrainingDiverged as error:
        stopped = str(error)
    np.savez(os.path.join(out, f"rank{rank}.npz"), recalls=recalls, descriptors=descriptors,
             values=gathered_values)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as file:
        json.dump({"averaged": averaged, "stopped": stopped}, file)
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def ranks_outputs(synthetic_dataset, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ranks"))
    torch.multiprocessing.spawn(rank_process, args=(synthetic_dataset, out), nprocs=WORLD_SIZE, join=True)
    outputs = []
    for rank in range(WORLD_SIZE):
        with open(os.path.join(out, f"rank{rank}.json")) as file:
            outputs.append({**json.load(file), **np.load(os.path.join(out, f"rank{rank}.npz"))})
    return outputs


def test_shares_of_indices_partition_them():
    for total in (0, 1, 5, 36, 37):
        for world_size in (1, 2, 3, 4):
            shares = [list(distributed.shard(range(total), world_size, rank)) for rank in range(world_size)]
            assert sum(shares, []) == list(range(total))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_sharded_validation_gives_the_descriptors_and_recalls_of_one_process(ranks_outputs, synthetic_dataset):
    args = eval_args(synthetic_dataset)
    val_ds = TestDataset(os.path.join(synthetic_dataset, "val"), image_size=48)
    tested = recalls_with_flags(args, val_ds, seeded_model(args))
    recalls, descriptors = tested.recalls, tested.descriptors
    assert descriptors.shape == (36, 32) and 0 < recalls[0] < 100  # a real ranking: not all hits, not all misses
    for output in ranks_outputs:
        np.testing.assert_allclose(output["descriptors"], descriptors, rtol=1e-5, atol=1e-6)
        assert list(output["recalls"]) == list(recalls)


def test_rows_gathered_in_uneven_shares_and_losses_averaged(ranks_outputs):
    for output in ranks_outputs:
        np.testing.assert_array_equal(output["values"], np.arange(5)[:, None] * np.ones((1, 3)))
        assert output["averaged"] == [{"loss": 1.0, "ssl": 1.0}, {"loss": 2.0, "ssl": 3.0}]  # (0+1+2)/3, (0+2+4)/3


def test_a_nan_on_one_rank_stops_every_rank_with_one_message(ranks_outputs):
    messages = {output["stopped"] for output in ranks_outputs}
    assert len(messages) == 1 and messages.pop().startswith("The loss became nan at epoch 0, iteration 8: training "
                                                            "stopped")
