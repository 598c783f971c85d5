"""Checkpoints: reading any weights file with a clear error (.pth, or the model.safetensors of publish_model.py), and
the training checkpoint (last_checkpoint.pth) that lets a run continue exactly where it stopped. Every function takes
what it works on as arguments."""

import logging
import math
import os
import pickle
import zipfile
from dataclasses import dataclass, field

import safetensors.torch
import torch

import commons
from training import losses_log
from core import files
from core.errors import UserError


class CheckpointError(UserError, ValueError):
    """A weights file that is missing, not a checkpoint, or made for another architecture."""


def read_checkpoint(path):
    """Loads a checkpoint file, or raises CheckpointError saying what is wrong with it."""
    if os.path.isdir(path):
        names = ("best_model.pth", "last_checkpoint.pth", "model.safetensors")
        inside = [os.path.join(path, name) for name in names if os.path.isfile(os.path.join(path, name))]
        raise CheckpointError(f"{path} is a folder, not a checkpoint: give the checkpoint file inside it ("
                              + (" or ".join(inside) if inside else "a run folder holds best_model.pth and "
                                 "last_checkpoint.pth; a folder of publish_model.py, model.safetensors") + ")")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    if path.endswith(".safetensors"):  # tensors only: loading runs no pickled code
        try:
            return safetensors.torch.load_file(path, device="cpu")
        except safetensors.SafetensorError as e:
            raise CheckpointError(f"{path} cannot be read as a safetensors file: a damaged or truncated file (a copy "
                                  f"or a download cut short?); download or publish it again ({e})") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, AttributeError, ValueError) as e:
        raise CheckpointError(f"{path} cannot be read as a PyTorch checkpoint: a damaged or truncated file (a copy or a "
                              f"download cut short?), or another kind of file; give a complete checkpoint "
                              f"({type(e).__name__}: {e})") from e


def extract_model_state_dict(checkpoint, path):
    """Accepts a plain state dict (our best_model.pth, the released CosPlace weights), one of our training
    checkpoints (key model_state_dict), and DDP state dicts (keys prefixed by 'module.')."""
    if isinstance(checkpoint, dict) and "model_state_dict" in checkpoint:
        checkpoint = checkpoint["model_state_dict"]
    if not isinstance(checkpoint, dict) or not all(isinstance(k, str) for k in checkpoint):
        raise CheckpointError(f"{path} is not a model checkpoint: expected a state dict")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in checkpoint.items()}


def state_dict_mismatch(module, state_dict):
    """Why state_dict cannot be loaded into module: the keys missing or unexpected and the shapes that differ
    ('' when it fits)."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
                    for k, v in expected.items() if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    details = []
    if missing:
        details.append(f"{len(missing)} keys missing from the checkpoint, e.g. {missing[:4]}")
    if unexpected:
        details.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[:4]}")
    if wrong_shapes:
        details.append(f"{len(wrong_shapes)} shapes differ, e.g. {wrong_shapes[:3]}")
    return "; ".join(details)


def read_model_weights(path, checkpoint=None):
    """The model's state dict in the weights file path, whatever kind of checkpoint it is (checkpoint: its content,
    if already read)."""
    return extract_model_state_dict(read_checkpoint(path) if checkpoint is None else checkpoint, path)


def load_model_weights(model, path, checkpoint=None):
    """Loads weights into model (from checkpoint if already read from path), with an error naming the keys
    and shapes that do not match."""
    state_dict = read_model_weights(path, checkpoint)
    mismatch = state_dict_mismatch(model, state_dict)
    if mismatch:
        raise CheckpointError(f"{path} does not fit this model (--backbone, --aggregator, --fc_output_dim?): "
                              + mismatch)
    model.load_state_dict(state_dict)

# Fields of a metrics record that measure the machine (speed, memory, time), not the training: two runs of the same
# training differ in them only
MEASUREMENT_SUFFIXES = ("_time_s", "_per_s", "_memory_mb")


def is_measurement(key):
    return str(key).endswith(MEASUREMENT_SUFFIXES)


@dataclass
class TrainingProgress:
    """Where a training is: the next epoch and iteration, the best val R@1 so far, the losses of the current epoch
    (recorded_losses of them are already in a validation record) and every validation record so far."""
    epoch_num: int = 0
    iteration: int = 0
    best_val_recall1: float = 0.0
    epoch_losses: list = field(default_factory=list)
    recorded_losses: int = 0
    metrics_history: list = field(default_factory=list)

    def add_validation(self, recalls, recall_values, **fields):
        """The record of a validation: fields, the mean of each loss term since the previous record, the val
        recalls; kept in metrics_history. Returns it, and whether its R@1 beats every validation so far."""
        terms = losses_log.mean_terms(self.epoch_losses[self.recorded_losses:])
        self.recorded_losses = len(self.epoch_losses)
        record = {**fields, "loss": terms.pop("loss", None), **terms,
                  **{f"val_R@{n}": float(r) for n, r in zip(recall_values, recalls)}}
        self.metrics_history.append(record)
        is_best = recalls[0] > self.best_val_recall1
        self.best_val_recall1 = max(recalls[0], self.best_val_recall1)
        return record, is_best

    def next_epoch(self):
        """Where the loop stands once an epoch is done (its losses are all in its last record)."""
        self.epoch_num, self.iteration = self.epoch_num + 1, 0
        self.epoch_losses, self.recorded_losses = [], 0

    @property
    def best_step(self):
        """The step of the validation best_model.pth was saved at: the first record whose first recall (R@1 by
        default) reached best_val_recall1; None when no model was saved."""
        first_recall = lambda record: next(value for key, value in record.items() if key.startswith("val_R@"))
        return next((record.get("step") for record in self.metrics_history
                     if self.best_val_recall1 > 0 and first_recall(record) == self.best_val_recall1), None)


@dataclass
class TrainingState:
    """Everything a training checkpoint saves and restores, besides the progress and the RNG states."""
    model: torch.nn.Module
    model_optimizer: torch.optim.Optimizer
    classifiers: list
    classifiers_optimizers: list
    auxiliary_losses: list
    auxiliary_optimizers: list
    schedulers: list
    scaler: torch.amp.GradScaler


def atomic_torch_save(obj, path):
    """torch.save through files.atomic_write: a kill leaves the previous file or this one, never a truncated one."""
    files.atomic_write(path, lambda file: torch.save(obj, file))


def save_safetensors(state_dict, path):
    """A state dict as a safetensors file, written atomically: tensors only, which anyone can load without running
    pickled code (the format of the Hugging Face Hub). Each tensor is a contiguous copy, as safetensors takes no
    views nor tensors that share memory."""
    tensors = {name: tensor.detach().cpu().clone(memory_format=torch.contiguous_format)
               for name, tensor in state_dict.items()}
    files.atomic_write(path, lambda file: file.write(safetensors.torch.save(tensors, metadata={"format": "pt"})))


def weights_are_finite(modules):
    """False when a weight of the modules is NaN or infinite (a finite loss can still leave such weights)."""
    return all(bool(torch.isfinite(t).all()) for module in modules for t in module.state_dict().values()
               if t.is_floating_point())


def save_training_checkpoint(path, state, progress, flags, world_size=1, is_main=True):
    """Writes last_checkpoint.pth atomically (a kill at any moment leaves the previous checkpoint or this one): a
    run resumed from it starts at progress.epoch_num, progress.iteration (set by the training loop), and flags
    ({flag: value} of the run) tell what changed when it is resumed with other ones. With the RNG
    states of every process: with DDP every process calls it, the main one writes. Weights that became NaN or
    infinite stop the run instead (TrainingDiverged)."""
    if not weights_are_finite([state.model, *state.classifiers]):
        raise TrainingDiverged(non_finite_message("The weights became non-finite", progress.epoch_num,
                                                  progress.iteration, path))
    rng_states = [commons.get_rng_states()]
    if world_size > 1:
        rng_states = [None] * world_size
        torch.distributed.all_gather_object(rng_states, commons.get_rng_states())
    if not is_main:
        return
    atomic_torch_save({
        "epoch_num": progress.epoch_num, "iteration": progress.iteration,
        "best_val_recall1": progress.best_val_recall1, "epoch_losses": progress.epoch_losses,
        "recorded_losses": progress.recorded_losses, "metrics_history": progress.metrics_history,
        "model_state_dict": state.model.state_dict(), "optimizer_state_dict": state.model_optimizer.state_dict(),
        "classifiers_state_dict": [c.state_dict() for c in state.classifiers],
        "classifiers_optimizers_state_dict": [o.state_dict() for o in state.classifiers_optimizers],
        "auxiliary_losses_state_dict": [a.state_dict() for a in state.auxiliary_losses],
        "auxiliary_optimizers_state_dict": [o.state_dict() for o in state.auxiliary_optimizers],
        "schedulers_state_dict": [s.state_dict() for s in state.schedulers],
        "scaler_state_dict": state.scaler.state_dict(), "rng_states": rng_states, "args": flags,
    }, path)
    logging.debug(f"Checkpoint saved: epoch {progress.epoch_num}, iteration {progress.iteration}")


def changed_flags(checkpoint_flags, flags, ignored=("resume_train", "flags_from_checkpoint")):
    """'--flag old -> new' for every flag of flags ({flag: value}) whose value differs from the checkpoint's run."""
    return [f"--{k} {v} -> {flags[k]}" for k, v in checkpoint_flags.items()
            if k not in ignored and k in flags and flags[k] != v]


def resume_training(path, state, run_flags, world_size=1, rank=0, output_folder=None):
    """Loads a training checkpoint into state and this process's RNG states; returns its TrainingProgress (run_flags:
    {flag: value} of this run, compared with the checkpoint's). The
    run's best_model.pth is copied into output_folder (the final test uses the best model of the whole training).
    A checkpoint of another setup (groups, losses, classifiers) is a CheckpointError saying which flags to fix."""
    checkpoint = read_checkpoint(path)
    if not isinstance(checkpoint, dict) or "classifiers_state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is not a training checkpoint (last_checkpoint.pth): to start from model "
                              f"weights use --resume_model")
    for key, modules, flags in (("classifiers_state_dict", state.classifiers, "--groups_num and class parameters"),
                                ("auxiliary_losses_state_dict", state.auxiliary_losses,
                                 "--ssl_loss and --da_target_folder")):
        if len(checkpoint[key]) != len(modules):
            raise CheckpointError(f"{path} has {len(checkpoint[key])} {key.split('_state')[0].replace('_', ' ')}, "
                                  f"this run {len(modules)}: use the same {flags}")
    changed = changed_flags(checkpoint["args"], run_flags)
    if changed:
        logging.warning(f"Flags that differ from the run of {path} (optimizer states, hence learning rates, come "
                        f"from the checkpoint): {', '.join(changed)}")
    load_model_weights(state.model, path, checkpoint)
    state.model_optimizer.load_state_dict(checkpoint["optimizer_state_dict"])
    for group_num, (classifier, weights) in enumerate(zip(state.classifiers, checkpoint["classifiers_state_dict"])):
        mismatch = state_dict_mismatch(classifier, weights)
        if mismatch:
            raise CheckpointError(f"{path}: the classifier of group {group_num} does not fit this run (same dataset, "
                                  f"--M, --alpha, --N, --L, --min_images_per_class, --fc_output_dim, --loss?): "
                                  f"{mismatch}")
        classifier.load_state_dict(weights)
    pairs = [(state.classifiers_optimizers, "classifiers_optimizers_state_dict"),
             (state.auxiliary_losses, "auxiliary_losses_state_dict"),
             (state.auxiliary_optimizers, "auxiliary_optimizers_state_dict"),
             (state.schedulers, "schedulers_state_dict")]
    for stateful_objects, key in pairs:
        for stateful, saved in zip(stateful_objects, checkpoint[key]):
            stateful.load_state_dict(saved)
    if checkpoint["scaler_state_dict"]:  # empty when saved by a disabled scaler (CPU, no fp16)
        state.scaler.load_state_dict(checkpoint["scaler_state_dict"])
    progress = TrainingProgress(checkpoint["epoch_num"], checkpoint["iteration"], checkpoint["best_val_recall1"],
                                checkpoint["epoch_losses"], checkpoint.get("recorded_losses", 0),
                                checkpoint["metrics_history"])
    progress.epoch_losses = [v if isinstance(v, dict) else {"loss": v} for v in progress.epoch_losses]  # old: floats
    rng_states = checkpoint["rng_states"]  # one per process (a dict in the checkpoints of the first release)
    rng_states = [rng_states] if isinstance(rng_states, dict) else rng_states
    if len(rng_states) != world_size:
        logging.warning(f"{path} was written by a run of {len(rng_states)} processes, this one has {world_size}: "
                        f"the batches and augmentations will differ from those of an uninterrupted run")
    commons.set_rng_states(rng_states[rank % len(rng_states)])
    run_folder = os.path.dirname(os.path.abspath(path))
    removed = files.remove_stale_temporary_files(run_folder)
    if removed:
        logging.info(f"Removed {len(removed)} temporary files left by a killed write: {', '.join(removed)}")
    previous_best_model = os.path.join(run_folder, "best_model.pth")
    if output_folder and os.path.exists(previous_best_model):
        files.atomic_copy(previous_best_model, os.path.join(output_folder, "best_model.pth"))
    logging.info(f"Resuming from epoch {progress.epoch_num}, iteration {progress.iteration}, "
                 f"best R@1 {progress.best_val_recall1:.1f}")
    return progress


def non_finite_message(what, epoch_num, iteration, checkpoint_path):
    """The one-line message of a run stopped by a NaN or infinite loss or weight."""
    return (f"{what} at epoch {epoch_num}, iteration {iteration}: training stopped. The last good checkpoint, if "
            f"any, is {checkpoint_path}; try a lower --lr / --classifiers_lr, or --amp none")


class TrainingDiverged(UserError, FloatingPointError):
    """The loss or the weights became NaN or infinite."""


def check_finite_losses(values, epoch_num, last_iteration, checkpoint_path):
    """Raises TrainingDiverged at the first non-finite loss of values (the losses up to last_iteration)."""
    for position, value in enumerate(values):
        if not math.isfinite(value):
            raise TrainingDiverged(non_finite_message(f"The loss became {value}", epoch_num,
                                                      last_iteration - len(values) + position + 1, checkpoint_path))
