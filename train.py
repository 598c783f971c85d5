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
import parser
import test
import visualizations
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
model_optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr)

#### Datasets
groups = load_groups(args.train_set_folder, args.M, args.alpha, args.N, args.L, args.min_images_per_class,
                     args.cache_folder, args.on_bad_name)
check_groups(groups, args.groups_num, args.min_images_per_class, args.train_set_folder)
logging.info(f"{args.train_set_folder} has {len(groups)} groups; using the {args.groups_num} largest: "
             f"classes per group {[len(g) for g in groups[:args.groups_num]]} (all: {[len(g) for g in groups]})")
groups = [TrainDataset(classes, args.image_size, args.on_bad_image) for classes in groups[:args.groups_num]]
for group_num, group in enumerate(groups):
    images_per_class = [len(c) for c in group.classes]
    seen_per_epoch = args.iterations_per_epoch * args.batch_size * world_size / len(group)
    logging.info(f"Group {group_num}: {len(group)} classes, {group.images_num} images, images per class "
                 f"min/mean/max {min(images_per_class)}/{np.mean(images_per_class):.1f}/{max(images_per_class)}; "
                 f"each class is seen {seen_per_epoch:.1f} times in an epoch that trains this group")

#### Classifiers (one margin head per group), their optimizers, augmentation
classifiers = [cosface_loss.get_margin_head(args.loss, args.fc_output_dim, len(group), args.loss_scale,
                                            args.loss_margin) for group in groups]
classifiers_optimizers = [torch.optim.Adam(c.parameters(), lr=args.classifiers_lr) for c in classifiers]
criterion = torch.nn.CrossEntropyLoss()
train_augmentation = augmentations.TrainAugmentation(args.augmentations, args).to(args.device)
scaler = torch.amp.GradScaler("cuda", enabled=args.amp == "fp16" and args.device.startswith("cuda"))

val_ds = TestDataset(args.val_set_folder, args.positive_dist_threshold, args.test_image_size, args.on_bad_name)
test_ds = TestDataset(args.test_set_folder, args.positive_dist_threshold, args.test_image_size, args.on_bad_name)
logging.info(f"Validation set: {val_ds}")
logging.info(f"Test set: {test_ds}")

#### Resume
start_epoch_num, start_iteration, best_val_recall1 = 0, 0, 0.0
epoch_losses, metrics_history = [], []
if args.resume_train:
    checkpoint = network.read_checkpoint(args.resume_train)
    if not isinstance(checkpoint, dict) or "classifiers_state_dict" not in checkpoint:
        raise network.CheckpointError(f"{args.resume_train} is not a training checkpoint (last_checkpoint.pth): "
                                      f"to start from model weights use --resume_model")
    if len(checkpoint["classifiers_state_dict"]) != len(classifiers):
        raise network.CheckpointError(f"{args.resume_train} has {len(checkpoint['classifiers_state_dict'])} groups, "
                                      f"this run {len(classifiers)}: use the same --groups_num and class parameters")
    network.load_model_weights(model, args.resume_train)
    model_optimizer.load_state_dict(checkpoint["optimizer_state_dict"])
    for classifier, state in zip(classifiers, checkpoint["classifiers_state_dict"]):
        classifier.load_state_dict(state)
    for optimizer, state in zip(classifiers_optimizers, checkpoint["classifiers_optimizers_state_dict"]):
        optimizer.load_state_dict(state)
    scaler.load_state_dict(checkpoint["scaler_state_dict"])
    start_epoch_num, start_iteration = checkpoint["epoch_num"], checkpoint["iteration"]
    best_val_recall1, epoch_losses = checkpoint["best_val_recall1"], checkpoint["epoch_losses"]
    metrics_history = checkpoint["metrics_history"]
    commons.set_rng_states(checkpoint["rng_states"])
    logging.info(f"Resuming from epoch {start_epoch_num}, iteration {start_iteration}, best R@1 {best_val_recall1:.1f}")
    del checkpoint
if is_main:
    metrics_path = os.path.join(output_folder, "metrics.jsonl")
    for record in metrics_history:  # each run folder holds the whole history of the training
        commons.append_jsonl(record, metrics_path)


def save_checkpoint(epoch_num, iteration):
    """Everything needed to continue exactly from here; written atomically by the main process."""
    if not is_main:
        return
    commons.atomic_torch_save({
        "epoch_num": epoch_num, "iteration": iteration, "best_val_recall1": best_val_recall1,
        "model_state_dict": model.state_dict(), "optimizer_state_dict": model_optimizer.state_dict(),
        "classifiers_state_dict": [c.state_dict() for c in classifiers],
        "classifiers_optimizers_state_dict": [o.state_dict() for o in classifiers_optimizers],
        "scaler_state_dict": scaler.state_dict(), "rng_states": commons.get_rng_states(),
        "epoch_losses": epoch_losses, "metrics_history": metrics_history, "args": vars(args),
    }, os.path.join(output_folder, "last_checkpoint.pth"))


def flush_losses(pending_losses):
    """Reads the losses kept on the device (one wait for the device, not one per iteration) and stops the
    run on a non-finite loss, before anything could be checkpointed from it."""
    if pending_losses:
        values = torch.stack(pending_losses).float().cpu().tolist()
        pending_losses.clear()
        if not all(math.isfinite(v) for v in values):
            raise FloatingPointError(f"The loss became {values[-1]} at epoch {epoch_num}: training stopped. The last "
                                     f"good checkpoint is kept; try a lower --lr / --classifiers_lr, or --amp none")
        epoch_losses.extend(values)


class ModelWithHead(torch.nn.Module):
    """Model and the current group's head as one module, so DDP synchronises the gradients of both."""

    def __init__(self, model, head):
        super().__init__()
        self.model, self.head = model, head

    def forward(self, images, targets):
        descriptors = self.model(images)
        return self.head(descriptors, targets)


#### Train / evaluation loop
logging.info("Start training ...")
compiled_model = torch.compile(model) if args.compile else model
for epoch_num in range(start_epoch_num, args.epochs_num):
    epoch_start_time = time.time()
    current_group_num = epoch_num % args.groups_num
    classifiers[current_group_num] = classifiers[current_group_num].to(args.device)
    commons.move_optimizer_to_device(classifiers_optimizers[current_group_num], args.device)
    training_module = ModelWithHead(compiled_model, classifiers[current_group_num])
    if world_size > 1:
        training_module = torch.nn.parallel.DistributedDataParallel(training_module)
    group = groups[current_group_num]
    sampler = ClassBatchSampler([len(c) for c in group.classes], args.batch_size, args.seed, epoch_num,
                                start_iteration, rank, world_size)
    dataloader = torch.utils.data.DataLoader(group, batch_sampler=sampler, num_workers=args.num_workers,
                                             pin_memory=args.device.startswith("cuda"),
                                             persistent_workers=False, prefetch_factor=4 if args.num_workers else None,
                                             generator=torch.Generator().manual_seed(args.seed))
    dataloader_iterator = iter(dataloader)
    model = model.train()
    pending_losses = []
    for iteration in tqdm(range(start_iteration, args.iterations_per_epoch), ncols=100, disable=not is_main,
                          initial=start_iteration, total=args.iterations_per_epoch, desc=f"epoch {epoch_num:02d}"):
        images, targets = next(dataloader_iterator)
        images = images.to(args.device, non_blocking=True)
        targets = targets.to(args.device, non_blocking=True)
        images = train_augmentation(images).contiguous(memory_format=memory_format)
        model_optimizer.zero_grad(set_to_none=True)
        classifiers_optimizers[current_group_num].zero_grad(set_to_none=True)
        with test.autocast_context(args.device, args.amp):
            output = training_module(images, targets)
            loss = criterion(output.float(), targets)
        scaler.scale(loss).backward()
        scaler.step(model_optimizer)
        scaler.step(classifiers_optimizers[current_group_num])
        scaler.update()
        pending_losses.append(loss.detach())
        if (iteration + 1) % args.log_every == 0:
            flush_losses(pending_losses)
            logging.debug(f"Epoch {epoch_num:02d} iteration {iteration + 1}: mean loss {np.mean(epoch_losses):.4f}")
        if args.checkpoint_every and (iteration + 1) % args.checkpoint_every == 0 \
                and iteration + 1 < args.iterations_per_epoch:
            flush_losses(pending_losses)
            save_checkpoint(epoch_num, iteration + 1)
    flush_losses(pending_losses)
    del dataloader_iterator, dataloader
    start_iteration = 0
    classifiers[current_group_num] = classifiers[current_group_num].cpu()
    commons.move_optimizer_to_device(classifiers_optimizers[current_group_num], "cpu")
    train_time = time.time() - epoch_start_time

    #### Evaluation (main process; the others wait and receive R@1)
    recalls = np.zeros(len(args.recall_values))
    if is_main:
        recalls = test.test(args, val_ds, model)
    if world_size > 1:
        recalls_tensor = torch.tensor(recalls, device=args.device if args.device.startswith("cuda") else "cpu")
        dist.broadcast(recalls_tensor, src=0)
        recalls = recalls_tensor.cpu().numpy()
    mean_loss = float(np.mean(epoch_losses))
    logging.info(f"Epoch {epoch_num:02d} in {train_time:.0f} s, loss = {mean_loss:.4f}, "
                 f"{val_ds}: {test.recalls_to_str(recalls, args.recall_values)}")
    is_best = recalls[0] > best_val_recall1
    best_val_recall1 = max(recalls[0], best_val_recall1)
    record = {"epoch": epoch_num, "group": current_group_num, "loss": mean_loss,
              **{f"val_R@{n}": float(r) for n, r in zip(args.recall_values, recalls)},
              "lr": model_optimizer.param_groups[0]["lr"],
              "classifiers_lr": classifiers_optimizers[current_group_num].param_groups[0]["lr"],
              "train_time_s": train_time, "epoch_time_s": time.time() - epoch_start_time}
    metrics_history.append(record)
    epoch_losses = []
    if is_main:
        commons.append_jsonl(record, metrics_path)
        save_checkpoint(epoch_num + 1, 0)
        if is_best:
            commons.atomic_torch_save(model.state_dict(), os.path.join(output_folder, "best_model.pth"))

logging.info(f"Trained for {args.epochs_num:02d} epochs, in total in {time.time() - start_time:.0f} s")

#### Test the best model on the test set
if is_main:
    best_model_path = os.path.join(output_folder, "best_model.pth")
    if os.path.exists(best_model_path):
        network.load_model_weights(model, best_model_path)
    recalls, predictions, _ = test.test(args, test_ds, model, return_details=True)
    logging.info(f"{test_ds}: {test.recalls_to_str(recalls, args.recall_values)}")
    commons.atomic_json_dump({"dataset": test_ds.dataset_folder, "model": best_model_path,
                              **{f"R@{n}": float(r) for n, r in zip(args.recall_values, recalls)}},
                             os.path.join(output_folder, "test_results.json"))
    if args.num_preds_to_save:
        visualizations.save_preds(predictions, test_ds, output_folder, args.num_preds_to_save,
                                  args.save_only_wrong_preds)
    logging.info("Experiment finished (without any errors)")
if world_size > 1:
    dist.destroy_process_group()
