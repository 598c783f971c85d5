"""training.checkpoints.py on its own: what a training checkpoint saves comes back into fresh objects, a diverged run is
stopped at the right iteration, and a checkpoint of another setup names the flags to fix."""

import math

import pytest
import torch

from training import checkpoints


def training_state(seed):
    """A tiny model, head, auxiliary loss and their optimizers, schedulers and scaler, initialised by seed."""
    torch.manual_seed(seed)
    model, head, auxiliary = torch.nn.Linear(4, 3), torch.nn.Linear(3, 2), torch.nn.Linear(3, 1)
    optimizers = [torch.optim.Adam(m.parameters(), lr=0.1) for m in (model, head, auxiliary)]
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in optimizers]
    return checkpoints.TrainingState(model, optimizers[0], [head], [optimizers[1]], [auxiliary], [optimizers[2]],
                                     schedulers, torch.amp.GradScaler("cuda", enabled=False))


def train_one_step(state):
    loss = state.classifiers[0](state.model(torch.ones(2, 4))).sum() + state.auxiliary_losses[0](
        state.model(torch.ones(2, 4))).sum()
    loss.backward()
    for optimizer in (state.model_optimizer, *state.classifiers_optimizers, *state.auxiliary_optimizers):
        optimizer.step()
    for scheduler in state.schedulers:
        scheduler.step()


def test_a_saved_training_comes_back_exactly(tmp_path):
    state, flags = training_state(0), {"lr": 0.1, "seed": 0}
    train_one_step(state)
    progress = checkpoints.TrainingProgress(epoch_num=2, iteration=5, best_val_recall1=42.0,
                                            epoch_losses=[{"loss": 1.5}], recorded_losses=1,
                                            metrics_history=[{"step": 3, "val_R@1": 42.0}])
    path = str(tmp_path / "last_checkpoint.pth")
    torch.manual_seed(123)
    checkpoints.save_training_checkpoint(path, state, progress, flags)
    expected_random = torch.rand(3)
    restored = training_state(1)  # other weights, fresh optimizer states
    torch.manual_seed(999)
    resumed = checkpoints.resume_training(path, restored, flags)
    assert torch.equal(torch.rand(3), expected_random)  # the RNG continues where the checkpoint was written
    assert (resumed.epoch_num, resumed.iteration, resumed.best_val_recall1, resumed.best_step) == (2, 5, 42.0, 3)
    assert resumed.epoch_losses == [{"loss": 1.5}] and resumed.metrics_history == progress.metrics_history
    for original, loaded in ((state.model, restored.model), (state.classifiers[0], restored.classifiers[0]),
                             (state.auxiliary_losses[0], restored.auxiliary_losses[0])):
        assert all(torch.equal(a, b) for a, b in zip(original.state_dict().values(), loaded.state_dict().values()))
    assert restored.model_optimizer.state_dict()["state"][0]["exp_avg"].equal(
        state.model_optimizer.state_dict()["state"][0]["exp_avg"])
    assert restored.schedulers[0].get_last_lr() == state.schedulers[0].get_last_lr() == [0.05]


def test_validation_records_keep_the_loss_terms_since_the_previous_record_and_the_best():
    progress = checkpoints.TrainingProgress(epoch_losses=[{"loss": 4.0}, {"loss": 2.0, "ssl_loss": 1.0}])
    record, is_best = progress.add_validation([50.0, 70.0], [1, 5], step=2)
    assert record == {"step": 2, "loss": 3.0, "ssl_loss": 1.0, "val_R@1": 50.0, "val_R@5": 70.0} and is_best
    progress.epoch_losses.append({"loss": 1.0})
    record, is_best = progress.add_validation([40.0, 80.0], [1, 5], step=3)
    assert record["loss"] == 1.0 and not is_best and (progress.best_val_recall1, progress.best_step) == (50.0, 2)
    assert progress.add_validation([45.0, 80.0], [1, 5], step=3)[0]["loss"] is None  # no step since
    assert progress.add_validation([50.0, 90.0], [1, 5], step=4)[1] is False  # a tie keeps the first best
    assert progress.add_validation([60.0, 90.0], [1, 5], step=5)[1] and progress.best_step == 5


def test_non_finite_losses_and_weights_stop_at_the_right_place(tmp_path):
    with pytest.raises(checkpoints.TrainingDiverged, match="The loss became nan at epoch 1, iteration 8"):
        checkpoints.check_finite_losses([1.0, math.nan, 2.0], 1, 9, "ckpt")  # the losses of iterations 7, 8, 9
    state = training_state(0)
    with torch.no_grad():
        state.model.weight[0, 0] = math.inf
    assert not checkpoints.weights_are_finite([state.model])
    with pytest.raises(checkpoints.TrainingDiverged, match="The weights became non-finite at epoch 0, iteration 4"):
        checkpoints.save_training_checkpoint(str(tmp_path / "c.pth"), state, checkpoints.TrainingProgress(iteration=4),
                                             {})
    assert not (tmp_path / "c.pth").exists()


def test_a_checkpoint_of_another_setup_names_the_flags(tmp_path):
    state, flags = training_state(0), {"lr": 0.1}
    path = str(tmp_path / "last_checkpoint.pth")
    checkpoints.save_training_checkpoint(path, state, checkpoints.TrainingProgress(epoch_num=1), flags)
    other = training_state(0)
    other.auxiliary_losses.clear()
    with pytest.raises(checkpoints.CheckpointError, match="1 auxiliary losses, this run 0: use the same --ssl_loss"):
        checkpoints.resume_training(path, other, flags)
    with pytest.raises(checkpoints.CheckpointError, match="is not a training checkpoint"):
        torch.save(state.model.state_dict(), str(tmp_path / "best_model.pth"))
        checkpoints.resume_training(str(tmp_path / "best_model.pth"), training_state(0), flags)
    assert checkpoints.changed_flags({"lr": 0.1, "seed": 0}, {"lr": 0.2, "seed": 0}) == ["--lr 0.1 -> 0.2"]
