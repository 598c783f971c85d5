"""A run is decided by its flags and seed alone, not by its bookkeeping: validating more often, or being cut after
an epoch and resumed (with DANN's target images and an SSL loss on), ends with exactly the same weights, optimizer
states and RNG states."""

import os

import pytest
import torch

from training import checkpoints
from conftest import tiny_training_args, train_in_process
from test_resume import assert_identical


def load_checkpoint(folder):
    return torch.load(os.path.join(folder, "last_checkpoint.pth"), map_location="cpu", weights_only=False)


def assert_same_training(expected, actual):
    """The trained tensors (model, heads, auxiliary losses, optimizers) and the RNG states, bit for bit."""
    keys = ("model_state_dict", "classifiers_state_dict", "auxiliary_losses_state_dict", "optimizer_state_dict",
            "classifiers_optimizers_state_dict", "auxiliary_optimizers_state_dict", "rng_states")
    assert_identical({key: expected[key] for key in keys}, {key: actual[key] for key in keys}, "last_checkpoint.pth")


RUN_FLAGS = ("--epochs_num", "2", "--iterations_per_epoch", "3", "--image_size", "32", "--test_image_size", "32")


def test_validating_more_often_trains_the_same_weights(synthetic_dataset, tmp_path):
    plain = train_in_process(*tiny_training_args(synthetic_dataset, tmp_path / "plain", *RUN_FLAGS))
    validated = train_in_process(*tiny_training_args(synthetic_dataset, tmp_path / "validated", *RUN_FLAGS,
                                                     "--val_every", "2"))
    with open(os.path.join(validated, "metrics.jsonl")) as file:
        assert len(file.readlines()) == 5  # steps 0, 2, 3 (epoch end), 4, 6 (epoch end)
    assert_same_training(load_checkpoint(plain), load_checkpoint(validated))


class Stop(Exception):
    """Stands for a kill right after a checkpoint is written."""


@pytest.mark.parametrize("extension", [["--da_target_folder", "TARGET"], ["--ssl_loss", "vicreg"]],
                         ids=["dann", "ssl"])
def test_an_auxiliary_loss_run_cut_after_epoch_1_and_resumed_ends_as_uninterrupted(extension, synthetic_dataset,
                                                                                    tmp_path, monkeypatch):
    extension = [os.path.join(synthetic_dataset, "test", "queries") if flag == "TARGET" else flag
                 for flag in extension]
    flags = [*RUN_FLAGS, *extension]
    uninterrupted = train_in_process(*tiny_training_args(synthetic_dataset, tmp_path / "whole", *flags))
    save = checkpoints.save_training_checkpoint

    def save_then_stop(path, state, progress, *args, **kwargs):
        save(path, state, progress, *args, **kwargs)
        if progress.epoch_num == 1:
            raise Stop(path)
    monkeypatch.setattr(checkpoints, "save_training_checkpoint", save_then_stop)
    with pytest.raises(Stop) as stop:
        train_in_process(*tiny_training_args(synthetic_dataset, tmp_path / "cut", *flags))
    monkeypatch.setattr(checkpoints, "save_training_checkpoint", save)
    resumed = train_in_process(*tiny_training_args(synthetic_dataset, tmp_path / "cut", *flags, "--resume_train",
                                                   str(stop.value)))
    assert_same_training(load_checkpoint(uninterrupted), load_checkpoint(resumed))
