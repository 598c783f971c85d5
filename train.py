"""Trains a geo-localization network with CosPlace: per-group margin classifiers on top of backbone + GeM.

    python train.py --dataset_folder /path/to/sf_xs --groups_num 1 --epochs_num 3
Multi-GPU:  torchrun --nproc_per_node 4 train.py ...   (one process per GPU, DistributedDataParallel)
"""

import functools
import logging
import os
import sys
import time

import parser
from core.errors import exit_on_user_error

args = exit_on_user_error(parser.parse_arguments, "train", None, parser.build_parser("train", __doc__))
# --help and flag mistakes answered above, before the heavy imports below
start_time = time.time()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from tqdm import tqdm  # noqa: E402

import augmentations  # noqa: E402
import checkpoints  # noqa: E402
import commons  # noqa: E402
import cosface_loss  # noqa: E402
import domain_adaptation  # noqa: E402
import optimizers  # noqa: E402
import ssl_losses  # noqa: E402
import test  # noqa: E402
import visualizations  # noqa: E402
from core import files  # noqa: E402
from datasets import preresize, unlabeled_dataset  # noqa: E402
from datasets.image_check import make_image_check  # noqa: E402
from datasets.image_loading import images_to_device  # noqa: E402
from datasets.normalization import normalize  # noqa: E402
from datasets.test_dataset import TestDataset  # noqa: E402
from datasets.train_dataset import TrainDataset, check_groups, load_groups  # noqa: E402
from model import network  # noqa: E402

torch.backends.cudnn.benchmark = True  # input sizes are fixed during training

#### Processes (DDP through torchrun: one per GPU; a single process otherwise)
world_size, rank = commons.setup_distributed(args)
is_main = rank == 0

#### Logging: only the main process writes (logs, checkpoints)
output_folder = exit_on_user_error(files.make_output_folder, args.save_dir, args.logs_root) if is_main else None
checkpoint_path = os.path.join(output_folder or ".", "last_checkpoint.pth")
if is_main:
    commons.setup_logging(output_folder, console="debug",
                          interrupt_message=functools.partial(commons.resume_hint, checkpoint_path))
    files.atomic_json_dump({**vars(args), "git_commit": files.git_commit(), "command": " ".join(sys.argv),
                            "world_size": world_size}, os.path.join(output_folder, "args.json"))
else:
    logging.basicConfig(level=logging.WARNING)
commons.log_arguments(args, output_folder)
commons.make_deterministic(args.seed)
commons.reuse_freed_memory()

#### Model
model = network.build_model(args)
logging.info(f"There are {torch.cuda.device_count()} GPUs and {os.cpu_count()} CPUs; training on {args.device}"
             + (f" with {world_size} processes" if world_size > 1 else ""))
if args.resume_model is not None:
    logging.info(f"Loading model from {args.resume_model}")
    checkpoints.load_model_weights(model, args.resume_model)
memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
model = model.to(args.device).to(memory_format=memory_format)
model_optimizer = optimizers.get_optimizer([p for p in model.parameters() if p.requires_grad], args.lr, args)

#### Datasets (the test sets first: they are quick to read, so their problems show before the class computation)
val_ds, test_ds = [TestDataset(folder, args.positive_dist_threshold, args.test_image_size, args.on_bad_name,
                               make_image_check(args, test_set=True), args.decode_on_gpu, args.test_resize)
                   for folder in (args.val_set_folder, args.test_set_folder)]
logging.info(f"Validation set: {val_ds}")
logging.info(f"Test set: {test_ds}")
if args.preresize_cache:  # the main process writes (or finds) the resized copy, then tells the others where
    args.train_set_folder = commons.computed_on_main(lambda: preresize.preresize_folder(
        args.train_set_folder, args.image_size, args.preresize_cache, args.num_workers), world_size, is_main)
groups = load_groups(args.train_set_folder, args.M, args.alpha, args.N, args.L, args.min_images_per_class,
                     args.cache_folder, args.on_bad_name, make_image_check(args), args.groups_order)
check_groups(groups, args.groups_num, args.min_images_per_class, args.train_set_folder, args.batch_size * world_size,
             args.groups_order)
groups = [TrainDataset(classes, args.image_size, args.on_bad_image, args.decode_on_gpu)
          for classes in groups[:args.groups_num]]
for group_num, group in enumerate(groups):
    logging.info(group.describe(group_num, args.iterations_per_epoch * args.batch_size * world_size))

#### Data-dependent initialisation of the aggregation (NetVLAD's clusters), unless weights are loaded
if hasattr(model.aggregation, "initialize_from_features") and not (args.resume_train or args.resume_model):
    init_batches = groups[0].first_batches(args.aggregator_init_images, args.batch_size, args.seed)
    logging.info(f"Initialising the {args.aggregator} aggregation from {len(init_batches) * args.batch_size} images")
    model.initialize_aggregation(normalize(images_to_device(images, args.image_size, args.device))
                                 for images in init_batches)

#### Classifiers (one margin head per group), augmentation, auxiliary losses (--ssl_loss, DANN), their optimizers
classifiers = [cosface_loss.get_margin_head(args.loss, args.fc_output_dim, len(group), args.loss_scale,
                                            args.loss_margin) for group in groups]
classifiers_optimizers = [optimizers.get_optimizer(c.parameters(), args.classifiers_lr, args) for c in classifiers]
criterion = torch.nn.CrossEntropyLoss()
train_augmentation = augmentations.TrainAugmentation(args.augmentations, args).to(args.device)
make_target_batches = functools.partial(unlabeled_dataset.folder_batches, args.da_target_folder, args.image_size,
                                        args.batch_size, args.seed, rank=rank, num_workers=args.num_workers)
auxiliary_losses = [loss.to(args.device) for loss in (
    ssl_losses.build_ssl_loss(args, augmentations.TrainAugmentation(args.ssl_augmentations, args)),
    domain_adaptation.build_dann(args, train_augmentation, args.fc_output_dim, make_target_batches)) if loss]
auxiliary_parameters = [p for loss in auxiliary_losses for p in loss.parameters()]
auxiliary_optimizers = [optimizers.get_optimizer(auxiliary_parameters, args.classifiers_lr, args)] \
    if auxiliary_parameters else []
schedulers = [optimizers.EpochScheduler(optimizer, args)
              for optimizer in (model_optimizer, *classifiers_optimizers, *auxiliary_optimizers)]
scaler = torch.amp.GradScaler("cuda", enabled=args.amp == "fp16" and args.device.startswith("cuda"))
state = checkpoints.TrainingState(model, model_optimizer, classifiers, classifiers_optimizers, auxiliary_losses,
                                  auxiliary_optimizers, schedulers, scaler)
if world_size > 1:  # every module was initialised alike; from here each process draws its own augmentations
    commons.make_deterministic(args.seed + rank)

#### Resume
progress = checkpoints.resume_training(args.resume_train, state, args, world_size, rank, output_folder) \
    if args.resume_train else checkpoints.TrainingProgress()
metrics_path = os.path.join(output_folder or ".", "metrics.jsonl")
for record in progress.metrics_history if is_main else ():  # each run folder holds the whole history
    files.append_jsonl(record, metrics_path)


def read_losses(epoch_num, iterations_done):
    """Reads the pending losses into the epoch's (stopping the run on a non-finite one); shows the loss."""
    read = pending_losses.read()
    checkpoints.check_finite_losses([terms["loss"] for terms in read], epoch_num, iterations_done, checkpoint_path)
    progress.epoch_losses.extend(read)
    if read and is_main:
        progress_bar.set_postfix(loss=f"{np.mean([terms['loss'] for terms in read]):.4f}", refresh=False)


def validate(epoch_num, iterations_done, **epoch_totals):
    """Val recalls of the model now (main process; the others receive them), recorded in metrics.jsonl with the
    mean loss terms since the previous record (and epoch_totals), and best_model.pth when R@1 beats every
    validation so far. Returns the record."""
    validation_start_time = time.time()
    recalls = commons.computed_on_main(lambda: test.test(args, val_ds, model), world_size, is_main)
    model.train()
    steps_done = epoch_num * args.iterations_per_epoch + iterations_done
    record, is_best = progress.add_validation(
        recalls, args.recall_values, epoch=epoch_num, iteration=iterations_done, step=steps_done,
        images_seen=steps_done * args.batch_size * world_size, group=epoch_num % args.groups_num,
        lr=model_optimizer.param_groups[0]["lr"], classifiers_lr=classifiers_optimizers[
            epoch_num % args.groups_num].param_groups[0]["lr"], run_time_s=time.time() - start_time, **epoch_totals)
    if "train_time_s" in epoch_totals:
        record["epoch_time_s"] = epoch_totals["train_time_s"] + time.time() - validation_start_time
    logging.info(f"Epoch {epoch_num:02d} iteration {iterations_done} ({steps_done} in all): "
                 + ", ".join(f"{k} = {v:.4f}" for k, v in record.items() if k.endswith(("loss", "accuracy")) and v)
                 + f"; {val_ds}: {test.recalls_to_str(recalls, args.recall_values)}")
    if is_main:
        files.append_jsonl(record, metrics_path)
        if is_best:  # before any checkpoint that counts on it
            files.atomic_torch_save(model.state_dict(), os.path.join(output_folder, "best_model.pth"))
    return record


#### Train / evaluation loop
logging.info("Start training ...")
if args.val_every and not args.resume_train:  # the curve starts at the model as initialised
    validate(0, 0)
compiled_model = torch.compile(model) if args.compile else model
pending_losses = commons.PendingLosses()
for epoch_num in range(progress.epoch_num, args.epochs_num):
    epoch_start_time, group_num = time.time(), epoch_num % args.groups_num
    classifiers[group_num] = commons.move_with_optimizer(classifiers[group_num], classifiers_optimizers[group_num],
                                                         args.device)
    training_module = network.ModelWithHead(compiled_model, classifiers[group_num], auxiliary_losses)
    if world_size > 1:
        training_module = torch.nn.parallel.DistributedDataParallel(training_module)
    dataloader = groups[group_num].loader(args.batch_size, args.seed, epoch_num, progress.iteration, rank, world_size,
                                          args.num_workers, pin_memory=args.device.startswith("cuda"))
    dataloader_iterator = iter(dataloader)
    model = model.train()
    progress_bar = tqdm(range(progress.iteration, args.iterations_per_epoch), ncols=100, disable=not is_main,
                        initial=progress.iteration, total=args.iterations_per_epoch, desc=f"epoch {epoch_num:02d}")
    for iteration in progress_bar:
        images, targets = next(dataloader_iterator)
        images = images_to_device(images, args.image_size, args.device)
        targets = targets.to(args.device, non_blocking=True)
        step = epoch_num * args.iterations_per_epoch + iteration
        auxiliary_images = [loss.extra_images(images, step).contiguous(memory_format=memory_format)
                            for loss in auxiliary_losses]
        images = train_augmentation(images).contiguous(memory_format=memory_format)
        for optimizer in (model_optimizer, classifiers_optimizers[group_num], *auxiliary_optimizers):
            optimizer.zero_grad(set_to_none=True)
        with test.autocast_context(args.device, args.amp):
            output, auxiliary_values = training_module(images, targets, auxiliary_images)
            loss = criterion(output.float(), targets) + sum(auxiliary_values)
        scaler.scale(loss).backward()
        for optimizer in (model_optimizer, classifiers_optimizers[group_num], *auxiliary_optimizers):
            scaler.step(optimizer)
        scaler.update()
        pending_losses.add(loss=loss, **{name: value for aux, aux_value in zip(auxiliary_losses, auxiliary_values)
                                         for name, value in aux.logged_terms(aux_value).items()})
        if (iteration + 1) % args.log_every == 0:
            read_losses(epoch_num, iteration + 1)
        if args.val_every and (step + 1) % args.val_every == 0 and iteration + 1 < args.iterations_per_epoch:
            read_losses(epoch_num, iteration + 1)
            validate(epoch_num, iteration + 1)
        if args.checkpoint_every and (iteration + 1) % args.checkpoint_every == 0 \
                and iteration + 1 < args.iterations_per_epoch:
            read_losses(epoch_num, iteration + 1)
            checkpoints.save_training_checkpoint(checkpoint_path, state, progress, args, epoch_num, iteration + 1,
                                                 world_size, is_main)
    read_losses(epoch_num, args.iterations_per_epoch)
    if world_size > 1:
        commons.check_replicas_in_sync([model, classifiers[group_num], *auxiliary_losses], world_size, epoch_num)
    del dataloader_iterator, dataloader
    classifiers[group_num] = commons.move_with_optimizer(classifiers[group_num], classifiers_optimizers[group_num],
                                                         "cpu")
    train_time = time.time() - epoch_start_time

    #### Evaluation at the end of the epoch; the record gets the epoch's totals
    record = validate(epoch_num, args.iterations_per_epoch, train_time_s=train_time,
                      epoch_loss=float(np.mean([terms["loss"] for terms in progress.epoch_losses])))
    progress.epoch_losses, progress.recorded_losses = [], 0
    for scheduler in schedulers:  # after the record: it logs the lr this epoch trained with
        scheduler.step(record[f"val_R@{args.recall_values[0]}"])
    checkpoints.save_training_checkpoint(checkpoint_path, state, progress, args, epoch_num + 1, 0, world_size, is_main)

logging.info(f"Trained for {args.epochs_num:02d} epochs, in total in {time.time() - start_time:.0f} s")

#### Test the best model on the test set
if is_main:
    if not args.keep_last_checkpoint:
        os.remove(checkpoint_path)
        logging.info(f"Removed {checkpoint_path}: the training has finished (--no-keep_last_checkpoint)")
    best_model_path = os.path.join(output_folder, "best_model.pth")
    if os.path.exists(best_model_path):
        checkpoints.load_model_weights(model, best_model_path)
    if progress.best_step == 0:
        logging.warning(f"No validation beat the network as loaded (val R@1 {progress.best_val_recall1:.1f} at step "
                        "0): best_model.pth holds the initial weights (a pretrained body? see --recipe finetune)")
    if args.adabn_folder:
        domain_adaptation.adapt_batchnorm(model, unlabeled_dataset.UnlabeledDataset(
            args.adabn_folder, args.test_image_size, args.test_resize), args.device, args.infer_batch_size,
            args.num_workers)
    recalls, predictions, _ = test.test(args, test_ds, model, return_details=True)
    logging.info(f"{test_ds}: {test.recalls_to_str(recalls, args.recall_values)}")
    test.save_test_results(os.path.join(output_folder, "test_results.json"), test_ds, best_model_path, recalls, args)
    visualizations.save_predictions_report(predictions, test_ds, output_folder, args.num_preds_to_save,
                                           args.save_only_wrong_preds, title=test.results_title(
                                               test_ds, best_model_path, recalls, args.recall_values))
    logging.info("Experiment finished (without any errors)")
if world_size > 1:
    dist.destroy_process_group()
