"""Trains a geo-localization network with CosPlace: per-group margin classifiers on top of backbone + GeM.

    python train.py --dataset_folder /path/to/sf_xs --groups_num 1 --epochs_num 3
Multi-GPU:  torchrun --nproc_per_node 4 train.py ...   (one process per GPU, DistributedDataParallel)
"""

import logging
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import augmentations
import commons
import cosface_loss
import domain_adaptation
import optimizers
import parser
import ssl_losses
import test
import visualizations
from datasets.image_check import make_image_check
from datasets import preresize
from datasets.image_loading import collate_images, images_to_device, normalize
from datasets.test_dataset import TestDataset
from datasets.train_dataset import ClassBatchSampler, TrainDataset, check_groups, load_groups
from model import network

torch.backends.cudnn.benchmark = True  # input sizes are fixed during training

args = parser.parse_arguments(is_training=True)
start_time = time.time()

#### Processes (DDP through torchrun: one per GPU; a single process otherwise)
world_size = int(os.environ.get("WORLD_SIZE", 1))
rank = int(os.environ.get("RANK", 0))
is_main = rank == 0
if world_size > 1:
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    backend = "nccl" if torch.cuda.is_available() and args.device != "cpu" else "gloo"
    dist.init_process_group(backend)
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        args.device = f"cuda:{local_rank}"
args.device = commons.resolve_device(args.device)

#### Logging: only the main process writes (logs, checkpoints)
if is_main:
    output_folder = commons.make_output_folder(args.save_dir, args.logs_root)
    commons.setup_logging(output_folder, console="debug")
    commons.atomic_json_dump({**vars(args), "git_commit": commons.git_commit(), "command": " ".join(sys.argv),
                              "world_size": world_size}, os.path.join(output_folder, "args.json"))
else:
    output_folder = None
    logging.basicConfig(level=logging.WARNING)
logging.info(" ".join(sys.argv))
logging.info(f"Arguments: {args}")
logging.info(f"The outputs are being saved in {output_folder}")
commons.make_deterministic(args.seed)
commons.reuse_freed_memory()

#### Model
model = network.build_model(args)
logging.info(f"There are {torch.cuda.device_count()} GPUs and {os.cpu_count()} CPUs; training on {args.device}"
             + (f" with {world_size} processes" if world_size > 1 else ""))
if args.resume_model is not None:
    logging.info(f"Loading model from {args.resume_model}")
    network.load_model_weights(model, args.resume_model)
model = model.to(args.device)
memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
model = model.to(memory_format=memory_format)
model_optimizer = optimizers.get_optimizer([p for p in model.parameters() if p.requires_grad], args.lr, args)

#### Datasets (the test sets first: they are quick to read, so their problems show before the class computation)
val_ds = TestDataset(args.val_set_folder, args.positive_dist_threshold, args.test_image_size, args.on_bad_name,
                     make_image_check(args, test_set=True), args.decode_on_gpu)
test_ds = TestDataset(args.test_set_folder, args.positive_dist_threshold, args.test_image_size, args.on_bad_name,
                      make_image_check(args, test_set=True), args.decode_on_gpu)
logging.info(f"Validation set: {val_ds}")
logging.info(f"Test set: {test_ds}")
if args.preresize_cache:  # the main process writes (or finds) the resized copy, then tells the others where
    train_set_folder = [preresize.preresize_folder(args.train_set_folder, args.image_size, args.preresize_cache,
                                                   args.num_workers) if is_main else None]
    if world_size > 1:
        dist.broadcast_object_list(train_set_folder, src=0)
    args.train_set_folder = train_set_folder[0]
groups = load_groups(args.train_set_folder, args.M, args.alpha, args.N, args.L, args.min_images_per_class,
                     args.cache_folder, args.on_bad_name, make_image_check(args))
check_groups(groups, args.groups_num, args.min_images_per_class, args.train_set_folder, args.batch_size * world_size)
logging.info(f"{args.train_set_folder} has {len(groups)} groups; using the {args.groups_num} largest: "
             f"classes per group {[len(g) for g in groups[:args.groups_num]]} (all: {[len(g) for g in groups]})")
groups = [TrainDataset(classes, args.image_size, args.on_bad_image, args.decode_on_gpu)
          for classes in groups[:args.groups_num]]
for group_num, group in enumerate(groups):
    images_per_class = [len(c) for c in group.classes]
    seen_per_epoch = args.iterations_per_epoch * args.batch_size * world_size / len(group)
    logging.info(f"Group {group_num}: {len(group)} classes, {group.images_num} images, images per class "
                 f"min/mean/max {min(images_per_class)}/{np.mean(images_per_class):.1f}/{max(images_per_class)}; "
                 f"each class is seen {seen_per_epoch:.1f} times in an epoch that trains this group")

#### Data-dependent initialisation of the aggregation (NetVLAD's clusters), unless weights are loaded
if hasattr(model.aggregation, "initialize_from_features") and not (args.resume_train or args.resume_model):
    init_sampler = ClassBatchSampler([len(c) for c in groups[0].classes], args.batch_size, args.seed, epoch=0)
    init_batches_num = math.ceil(args.aggregator_init_images / args.batch_size)
    logging.info(f"Initialising the {args.aggregator} aggregation from {init_batches_num * args.batch_size} images "
                 f"of group 0")
    init_batches = (collate_images([groups[0][i] for i in init_sampler.batch(b)])[0] for b in range(init_batches_num))
    model.initialize_aggregation(normalize(images_to_device(images, args.image_size, args.device))
                                 for images in init_batches)

#### Classifiers (one margin head per group), their optimizers, augmentation
classifiers = [cosface_loss.get_margin_head(args.loss, args.fc_output_dim, len(group), args.loss_scale,
                                            args.loss_margin) for group in groups]
classifiers_optimizers = [optimizers.get_optimizer(c.parameters(), args.classifiers_lr, args) for c in classifiers]
criterion = torch.nn.CrossEntropyLoss()
train_augmentation = augmentations.TrainAugmentation(args.augmentations, args).to(args.device)
#### Auxiliary losses on the descriptors (--ssl_loss, --da_target_folder), one optimizer for their modules
auxiliary_losses = [loss.to(args.device) for loss in (ssl_losses.build_ssl_loss(args), domain_adaptation.build_dann(
    args, train_augmentation, args.fc_output_dim, rank)) if loss is not None]
auxiliary_parameters = [p for loss in auxiliary_losses for p in loss.parameters()]
auxiliary_optimizers = [optimizers.get_optimizer(auxiliary_parameters, args.classifiers_lr, args)] \
    if auxiliary_parameters else []
schedulers = [optimizers.EpochScheduler(optimizer, args)
              for optimizer in (model_optimizer, *classifiers_optimizers, *auxiliary_optimizers)]
scaler = torch.amp.GradScaler("cuda", enabled=args.amp == "fp16" and args.device.startswith("cuda"))
if world_size > 1:  # every module was initialised alike; from here each process draws its own augmentations
    commons.make_deterministic(args.seed + rank)

#### Resume
start_epoch_num, start_iteration, best_val_recall1 = 0, 0, 0.0
epoch_losses, recorded_losses, metrics_history = [], 0, []  # recorded_losses: those already in a val record
if args.resume_train:
    checkpoint = network.read_checkpoint(args.resume_train)
    if not isinstance(checkpoint, dict) or "classifiers_state_dict" not in checkpoint:
        raise network.CheckpointError(f"{args.resume_train} is not a training checkpoint (last_checkpoint.pth): "
                                      f"to start from model weights use --resume_model")
    if len(checkpoint["classifiers_state_dict"]) != len(classifiers):
        raise network.CheckpointError(f"{args.resume_train} has {len(checkpoint['classifiers_state_dict'])} groups, "
                                      f"this run {len(classifiers)}: use the same --groups_num and class parameters")
    changed_flags = [f"--{k} {v} -> {getattr(args, k)}" for k, v in checkpoint["args"].items()
                     if k != "resume_train" and getattr(args, k, v) != v]
    if changed_flags:
        logging.warning(f"Flags that differ from the run of {args.resume_train} (optimizer states, hence learning "
                        f"rates, come from the checkpoint): {', '.join(changed_flags)}")
    network.load_model_weights(model, args.resume_train, checkpoint)
    model_optimizer.load_state_dict(checkpoint["optimizer_state_dict"])
    for group_num, (classifier, state) in enumerate(zip(classifiers, checkpoint["classifiers_state_dict"])):
        mismatch = network.state_dict_mismatch(classifier, state)
        if mismatch:
            raise network.CheckpointError(f"{args.resume_train}: the classifier of group {group_num} does not fit this "
                                          f"run (same dataset, --M, --alpha, --N, --L, --min_images_per_class, "
                                          f"--fc_output_dim, --loss?): {mismatch}")
        classifier.load_state_dict(state)
    for optimizer, state in zip(classifiers_optimizers, checkpoint["classifiers_optimizers_state_dict"]):
        optimizer.load_state_dict(state)
    if len(checkpoint["auxiliary_losses_state_dict"]) != len(auxiliary_losses):
        raise network.CheckpointError(f"{args.resume_train} has {len(checkpoint['auxiliary_losses_state_dict'])} "
                                      f"auxiliary losses, this run {len(auxiliary_losses)}: use the same --ssl_loss "
                                      f"and --da_target_folder")
    for module, state in zip(auxiliary_losses, checkpoint["auxiliary_losses_state_dict"]):
        module.load_state_dict(state)
    for optimizer, state in zip(auxiliary_optimizers, checkpoint["auxiliary_optimizers_state_dict"]):
        optimizer.load_state_dict(state)
    for scheduler, state in zip(schedulers, checkpoint["schedulers_state_dict"]):
        scheduler.load_state_dict(state)
    if checkpoint["scaler_state_dict"]:  # empty when saved by a disabled scaler (CPU, no fp16)
        scaler.load_state_dict(checkpoint["scaler_state_dict"])
    start_epoch_num, start_iteration = checkpoint["epoch_num"], checkpoint["iteration"]
    best_val_recall1, epoch_losses = checkpoint["best_val_recall1"], checkpoint["epoch_losses"]
    recorded_losses = checkpoint.get("recorded_losses", 0)
    metrics_history = checkpoint["metrics_history"]
    rng_states = checkpoint["rng_states"]  # one per process (a dict in the checkpoints of the first release)
    rng_states = [rng_states] if isinstance(rng_states, dict) else rng_states
    if len(rng_states) != world_size:
        logging.warning(f"{args.resume_train} was written by a run of {len(rng_states)} processes, this one has "
                        f"{world_size}: the batches and augmentations will differ from those of an uninterrupted run")
    commons.set_rng_states(rng_states[rank % len(rng_states)])
    logging.info(f"Resuming from epoch {start_epoch_num}, iteration {start_iteration}, best R@1 {best_val_recall1:.1f}")
    del checkpoint
    previous_best_model = os.path.join(os.path.dirname(os.path.abspath(args.resume_train)), "best_model.pth")
    if is_main and os.path.exists(previous_best_model):  # the final test uses the best model of the whole training
        commons.atomic_copy(previous_best_model, os.path.join(output_folder, "best_model.pth"))
    elif is_main and metrics_history:
        logging.warning(f"No {previous_best_model}: the final test will use the best model of the epochs to come")
if is_main:
    metrics_path = os.path.join(output_folder, "metrics.jsonl")
    for record in metrics_history:  # each run folder holds the whole history of the training
        commons.append_jsonl(record, metrics_path)


def save_checkpoint(epoch_num, iteration):
    """Everything needed to continue exactly from here; written atomically by the main process, with the RNG
    states of every process (so every process calls it)."""
    weights = [t for module in (model, *classifiers) for t in module.state_dict().values() if t.is_floating_point()]
    if not all(bool(torch.isfinite(t).all()) for t in weights):  # a finite loss can leave NaN weights
        raise non_finite_error("The weights became non-finite", iteration or args.iterations_per_epoch)  # last done
    rng_states = [commons.get_rng_states()]
    if world_size > 1:
        rng_states = [None] * world_size
        dist.all_gather_object(rng_states, commons.get_rng_states())
    if not is_main:
        return
    commons.atomic_torch_save({
        "epoch_num": epoch_num, "iteration": iteration, "best_val_recall1": best_val_recall1,
        "model_state_dict": model.state_dict(), "optimizer_state_dict": model_optimizer.state_dict(),
        "classifiers_state_dict": [c.state_dict() for c in classifiers],
        "classifiers_optimizers_state_dict": [o.state_dict() for o in classifiers_optimizers],
        "auxiliary_losses_state_dict": [a.state_dict() for a in auxiliary_losses],
        "auxiliary_optimizers_state_dict": [o.state_dict() for o in auxiliary_optimizers],
        "schedulers_state_dict": [s.state_dict() for s in schedulers],
        "scaler_state_dict": scaler.state_dict(), "rng_states": rng_states,
        "epoch_losses": epoch_losses, "recorded_losses": recorded_losses, "metrics_history": metrics_history,
        "args": vars(args),
    }, os.path.join(output_folder, "last_checkpoint.pth"))
    logging.debug(f"Checkpoint saved: epoch {epoch_num}, iteration {iteration}")


def non_finite_error(what, at_iteration):
    checkpoint_path = os.path.join(output_folder or ".", "last_checkpoint.pth")
    return FloatingPointError(f"{what} at epoch {epoch_num}, iteration {at_iteration}: training stopped. The last "
                              f"good checkpoint, if any, is {checkpoint_path}; try a lower --lr / --classifiers_lr, "
                              f"or --amp none")


def flush_losses(pending_losses):
    """Reads the losses kept on the device (one wait for the device, not one per iteration) and stops the
    run on a non-finite loss, before anything could be checkpointed from it."""
    if pending_losses:
        values = torch.stack(pending_losses).float().cpu().tolist()
        pending_losses.clear()
        if not all(math.isfinite(v) for v in values):
            first = next(i for i, v in enumerate(values) if not math.isfinite(v))  # values end at iteration + 1
            raise non_finite_error(f"The loss became {values[first]}", iteration + 2 - len(values) + first)
        epoch_losses.extend(values)


def check_replicas_in_sync(modules):
    """DDP keeps the processes' weights equal by averaging their gradients before each (identical) optimizer
    step. Checked once per epoch on checksums of every weight, so that a module trained outside DDP stops
    the run instead of silently training different models."""
    checksums = torch.stack([torch.stack([p.detach().double().sum(), p.detach().double().square().sum()])
                             for module in modules for p in module.parameters()])
    gathered = [torch.empty_like(checksums) for _ in range(world_size)]
    dist.all_gather(gathered, checksums)
    if not all(torch.allclose(other, checksums, rtol=1e-6, atol=1e-9) for other in gathered):
        raise RuntimeError(f"Epoch {epoch_num}: the weights of the {world_size} DDP processes differ")
    logging.info(f"Epoch {epoch_num:02d}: the weights (model, head) of the {world_size} processes are identical")


class ModelWithHead(torch.nn.Module):
    """Model, the current group's head and the auxiliary losses as one module, so DDP synchronises the
    gradients of all. Each auxiliary loss compares the batch's descriptors with the descriptors of its own
    extra images (made by its extra_images: a second view of the batch for SSL, target images for DANN)."""

    def __init__(self, model, head, auxiliary_losses=()):
        super().__init__()
        self.model, self.head = model, head
        self.auxiliary_losses = torch.nn.ModuleList(auxiliary_losses)

    def forward(self, images, targets, auxiliary_images=()):
        """The head's logits, and the sum of the (weighted) auxiliary losses (0 without any)."""
        descriptors = self.model(images)
        auxiliary_loss = sum(loss(descriptors, self.model(extra_images), targets)
                             for loss, extra_images in zip(self.auxiliary_losses, auxiliary_images))
        return self.head(descriptors, targets), auxiliary_loss


def validate(epoch_num, iterations_done):
    """Val recalls of the current model (main process; the others receive them), a record in metrics_history
    (written to metrics.jsonl here, or at the end of the epoch with the epoch's totals) and best_model.pth
    when R@1 is the best of all validations so far."""
    global best_val_recall1, recorded_losses
    recalls = np.zeros(len(args.recall_values))
    if is_main:
        recalls = test.test(args, val_ds, model)
        model.train()
    if world_size > 1:
        recalls_tensor = torch.tensor(recalls, device=args.device if args.device.startswith("cuda") else "cpu")
        dist.broadcast(recalls_tensor, src=0)
        recalls = recalls_tensor.cpu().numpy()
    steps_done = epoch_num * args.iterations_per_epoch + iterations_done
    recent_losses = epoch_losses[recorded_losses:]
    recorded_losses = len(epoch_losses)
    mean_loss = float(np.mean(recent_losses)) if recent_losses else None  # None: validated before any step
    logging.info(f"Epoch {epoch_num:02d} iteration {iterations_done} ({steps_done} in all), loss = {mean_loss}, "
                 f"{val_ds}: {test.recalls_to_str(recalls, args.recall_values)}")
    record = {"epoch": epoch_num, "iteration": iterations_done, "step": steps_done,
              "images_seen": steps_done * args.batch_size * world_size, "group": epoch_num % args.groups_num,
              "loss": mean_loss,
              **{f"val_R@{n}": float(r) for n, r in zip(args.recall_values, recalls)},
              "lr": model_optimizer.param_groups[0]["lr"],
              "classifiers_lr": classifiers_optimizers[epoch_num % args.groups_num].param_groups[0]["lr"],
              "elapsed_s": time.time() - start_time}
    metrics_history.append(record)
    if is_main and iterations_done < args.iterations_per_epoch:
        commons.append_jsonl(record, metrics_path)
    if recalls[0] > best_val_recall1 and is_main:  # before any checkpoint, which must never count on a best
        commons.atomic_torch_save(model.state_dict(), os.path.join(output_folder, "best_model.pth"))  # not written
    best_val_recall1 = max(recalls[0], best_val_recall1)


#### Train / evaluation loop
logging.info("Start training ...")
if args.val_every and not args.resume_train:  # the curve starts at the model as initialised
    validate(0, 0)
compiled_model = torch.compile(model) if args.compile else model
for epoch_num in range(start_epoch_num, args.epochs_num):
    epoch_start_time = time.time()
    current_group_num = epoch_num % args.groups_num
    classifiers[current_group_num] = classifiers[current_group_num].to(args.device)
    commons.move_optimizer_to_device(classifiers_optimizers[current_group_num], args.device)
    training_module = ModelWithHead(compiled_model, classifiers[current_group_num], auxiliary_losses)
    if world_size > 1:
        training_module = torch.nn.parallel.DistributedDataParallel(training_module)
    group = groups[current_group_num]
    sampler = ClassBatchSampler([len(c) for c in group.classes], args.batch_size, args.seed, epoch_num,
                                start_iteration, rank, world_size)
    dataloader = torch.utils.data.DataLoader(group, batch_sampler=sampler, num_workers=args.num_workers,
                                             pin_memory=args.device.startswith("cuda"),
                                             persistent_workers=False, prefetch_factor=4 if args.num_workers else None,
                                             generator=torch.Generator().manual_seed(args.seed),
                                             collate_fn=collate_images)
    dataloader_iterator = iter(dataloader)
    model = model.train()
    pending_losses = []
    for iteration in tqdm(range(start_iteration, args.iterations_per_epoch), ncols=100, disable=not is_main,
                          initial=start_iteration, total=args.iterations_per_epoch, desc=f"epoch {epoch_num:02d}"):
        images, targets = next(dataloader_iterator)
        images = images_to_device(images, args.image_size, args.device)
        targets = targets.to(args.device, non_blocking=True)
        step = epoch_num * args.iterations_per_epoch + iteration
        auxiliary_images = [loss.extra_images(images, step).contiguous(memory_format=memory_format)
                            for loss in auxiliary_losses]
        images = train_augmentation(images).contiguous(memory_format=memory_format)
        model_optimizer.zero_grad(set_to_none=True)
        classifiers_optimizers[current_group_num].zero_grad(set_to_none=True)
        for optimizer in auxiliary_optimizers:
            optimizer.zero_grad(set_to_none=True)
        with test.autocast_context(args.device, args.amp):
            output, auxiliary_loss = training_module(images, targets, auxiliary_images)
            loss = criterion(output.float(), targets) + auxiliary_loss
        scaler.scale(loss).backward()
        scaler.step(model_optimizer)
        scaler.step(classifiers_optimizers[current_group_num])
        for optimizer in auxiliary_optimizers:
            scaler.step(optimizer)
        scaler.update()
        pending_losses.append(loss.detach())
        if (iteration + 1) % args.log_every == 0:
            flush_losses(pending_losses)
            logging.debug(f"Epoch {epoch_num:02d} iteration {iteration + 1}: mean loss {np.mean(epoch_losses):.4f}")
        if args.val_every and (step + 1) % args.val_every == 0 and iteration + 1 < args.iterations_per_epoch:
            flush_losses(pending_losses)
            validate(epoch_num, iteration + 1)
        if args.checkpoint_every and (iteration + 1) % args.checkpoint_every == 0 \
                and iteration + 1 < args.iterations_per_epoch:
            flush_losses(pending_losses)
            save_checkpoint(epoch_num, iteration + 1)
    flush_losses(pending_losses)
    if world_size > 1:
        check_replicas_in_sync([model, classifiers[current_group_num], *auxiliary_losses])
    del dataloader_iterator, dataloader
    start_iteration = 0
    classifiers[current_group_num] = classifiers[current_group_num].cpu()
    commons.move_optimizer_to_device(classifiers_optimizers[current_group_num], "cpu")
    train_time = time.time() - epoch_start_time

    #### Evaluation at the end of the epoch
    validate(epoch_num, args.iterations_per_epoch)
    record = metrics_history[-1]
    record.update({"epoch_loss": float(np.mean(epoch_losses)), "train_time_s": train_time,
                   "epoch_time_s": time.time() - epoch_start_time})
    if is_main:
        commons.append_jsonl(record, metrics_path)
    epoch_losses, recorded_losses = [], 0
    for scheduler in schedulers:  # after the record: it logs the lr this epoch trained with
        scheduler.step(record[f"val_R@{args.recall_values[0]}"])
    save_checkpoint(epoch_num + 1, 0)

logging.info(f"Trained for {args.epochs_num:02d} epochs, in total in {time.time() - start_time:.0f} s")
if is_main and not args.keep_last_checkpoint:
    os.remove(os.path.join(output_folder, "last_checkpoint.pth"))
    logging.info("Removed last_checkpoint.pth: the training has finished (--no-keep_last_checkpoint)")

#### Test the best model on the test set
if is_main:
    best_model_path = os.path.join(output_folder, "best_model.pth")
    if os.path.exists(best_model_path):
        network.load_model_weights(model, best_model_path)
    if args.adabn_folder:
        domain_adaptation.adapt_batchnorm(model, args.adabn_folder, args)
    recalls, predictions, _ = test.test(args, test_ds, model, return_details=True)
    logging.info(f"{test_ds}: {test.recalls_to_str(recalls, args.recall_values)}")
    commons.atomic_json_dump({"dataset": test_ds.dataset_folder, "model": best_model_path,
                              **{f"R@{n}": float(r) for n, r in zip(args.recall_values, recalls)}},
                             os.path.join(output_folder, "test_results.json"))
    visualizations.save_predictions_report(predictions, test_ds, output_folder, args.num_preds_to_save,
                                           args.save_only_wrong_preds)
    logging.info("Experiment finished (without any errors)")
if world_size > 1:
    dist.destroy_process_group()
