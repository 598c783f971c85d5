"""Trains a geo-localization network with CosPlace: per-group margin classifiers on top of backbone + GeM.

    python train.py --dataset_folder /path/to/sf_xs --groups_num 1 --epochs_num 3
Multi-GPU:  torchrun --nproc_per_node 4 train.py ...   (one process per GPU, DistributedDataParallel)
In Python:  train.main(parser.parse_arguments("train", [...flags...]))  returns the run folder
"""

import functools
import logging
import os
import sys
import time
from dataclasses import dataclass

import parser
from core.errors import exit_on_user_error

if __name__ == "__main__":  # --help and flag mistakes are answered here, before the heavy imports below
    ARGS = exit_on_user_error(parser.parse_arguments, "train", None, parser.build_parser("train", __doc__))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import augmentations  # noqa: E402
import commons  # noqa: E402
import cosface_loss  # noqa: E402
import test  # noqa: E402
import visualizations  # noqa: E402
from core import devices, distributed, files, logs  # noqa: E402
from datasets import preresize, unlabeled_dataset  # noqa: E402
from datasets.image_check import make_image_check  # noqa: E402
from datasets.image_loading import images_to_device  # noqa: E402
from datasets.normalization import normalize  # noqa: E402
from datasets.listing_cache import load_groups  # noqa: E402
from datasets.test_dataset import TestDataset, query_sets  # noqa: E402
from datasets.train_dataset import TrainDataset, check_groups  # noqa: E402
from evaluation import results as records  # noqa: E402
from model import network  # noqa: E402
from reranking import matchers  # noqa: E402
from reranking.stage import rerank_test  # noqa: E402
from retrieval.recalls import recalls_to_str  # noqa: E402
from training import checkpoints, domain_adaptation, live_curves, losses_log, optimizers, ssl_losses  # noqa: E402


@dataclass
class Run:
    """Who this process is and where the run writes: what every step of the training needs besides its own
    arguments. The clock fields measure the training time between two validation records (validations left out)."""
    args: object
    world_size: int
    rank: int
    output_folder: str  # None on the other DDP processes: only the main one writes
    start_time: float
    clock_start: float = 0.0
    clock_steps: int = 0
    time_estimated: bool = False
    curves: live_curves.TensorBoardCurves = None  # --tensorboard, on the main process

    @property
    def memory_format(self):
        """--channels_last: the memory format of the model and of every batch."""
        return torch.channels_last if self.args.channels_last else torch.contiguous_format

    @property
    def is_main(self):
        return self.rank == 0

    def path(self, name):
        return os.path.join(self.output_folder or ".", name)

    def restart_clock(self, steps_done):
        self.clock_start, self.clock_steps = time.time(), steps_done

    def write_metrics(self, record):
        """Appends a record to metrics.jsonl and, with --tensorboard, to the live curves (main process only)."""
        files.append_jsonl(record, self.path("metrics.jsonl"))
        if self.curves:
            self.curves.add(record)


def start_logging(args, world_size, rank):
    """The run folder (main process only: None elsewhere) with args.json, and the logging of this process; the other
    processes log only their warnings."""
    if rank != 0:  # one line per process for a user error: no traceback from torchrun's exception hook
        logging.basicConfig(level=logging.WARNING)
        sys.excepthook = sys.__excepthook__
        return None
    return logs.start_run(args.save_dir, args.logs_root, {**vars(args), "world_size": world_size},
                          parser.implicit_settings(args), console="debug", resumable=True)


def build_model(run):
    """The network of the flags on its device, with the weights of --resume_model when given."""
    model = network.GeoLocalizationNet(**parser.model_options(run.args))
    if run.args.resume_model is not None:
        logging.info(f"Loading model from {run.args.resume_model}")
        checkpoints.load_model_weights(model, run.args.resume_model)
    return model.to(run.args.device).to(memory_format=run.memory_format)


def test_datasets(args):
    """The validation set and the test set's query sets, one per query folder (Tokyo-XS: queries/ and night/), read
    first: they are quick, so their problems show before the classes."""
    image_check = make_image_check(args.check_images, args.on_bad_image, args.num_workers, test_set=True)
    options = parser.test_dataset_options(args)
    val_ds = TestDataset(args.val_set_folder, image_check=image_check, **options)
    test_sets = query_sets(args.test_set_folder, args.query_folders, image_check, **options)
    logging.info(f"Validation set: {val_ds}")
    for test_ds in test_sets:
        logging.info(f"Test set: {test_ds}")
    return val_ds, test_sets


def training_groups(args, run):
    """The TrainDataset of each group trained (the first --groups_num of --groups_order)."""
    if args.preresize_cache:  # the main process writes (or finds) the resized copy, then tells the others where
        args.train_set_folder = distributed.computed_on_main(lambda: preresize.preresize_folder(
            args.train_set_folder, args.image_size, args.preresize_cache, args.num_workers), run.world_size,
            run.is_main)
    groups = load_groups(args.train_set_folder, args.M, args.alpha, args.N, args.L, args.min_images_per_class,
                         args.cache_folder, args.on_bad_name,
                         make_image_check(args.check_images, args.on_bad_image, args.num_workers), args.groups_order)
    check_groups(groups, args.groups_num, args.min_images_per_class, args.train_set_folder,
                 args.batch_size * run.world_size, args.groups_order)
    groups = [TrainDataset(classes, args.image_size, args.on_bad_image, args.decode_on_gpu)
              for classes in groups[:args.groups_num]]
    for group_num, group in enumerate(groups):
        logging.info(group.describe(group_num, args.iterations_per_epoch * args.batch_size * run.world_size))
    return groups


def initialize_aggregation(args, model, first_group):
    """Data-dependent initialisation of the aggregation (NetVLAD's clusters), unless weights are loaded."""
    if hasattr(model.aggregation, "initialize_from_features") and not (args.resume_train or args.resume_model):
        init_batches = first_group.first_batches(args.aggregator_init_images, args.batch_size, args.seed)
        logging.info(f"Initialising the {args.aggregator} aggregation from {len(init_batches) * args.batch_size} "
                     f"images")
        model.initialize_aggregation(normalize(images_to_device(images, args.image_size, args.device))
                                     for images in init_batches)


def training_state(args, model, groups, train_augmentation, rank):
    """The margin heads (one per group), the auxiliary losses (--ssl_loss, DANN), every optimizer, scheduler and
    the AMP scaler: what a training checkpoint holds besides the progress."""
    optimizer_settings, schedule_settings = parser.optimizer_settings(args), parser.schedule_settings(args)
    model_optimizer = optimizers.get_optimizer([p for p in model.parameters() if p.requires_grad], args.lr,
                                               optimizer_settings)
    classifiers = [cosface_loss.get_margin_head(args.loss, args.fc_output_dim, len(group), args.loss_scale,
                                                args.loss_margin) for group in groups]
    classifiers_optimizers = [optimizers.get_optimizer(c.parameters(), args.classifiers_lr, optimizer_settings)
                              for c in classifiers]
    make_target_batches = functools.partial(unlabeled_dataset.folder_batches, args.da_target_folder,
                                            args.image_size, args.batch_size, args.seed, rank=rank,
                                            num_workers=args.num_workers)
    auxiliary_losses = [loss.to(args.device) for loss in (
        ssl_losses.build_ssl_loss(args.ssl_loss, args.ssl_weight, augmentations.TrainAugmentation(
            args.ssl_augmentations, parser.augmentation_defaults(args))),
        domain_adaptation.build_dann(args.da_target_folder, args.da_weight, train_augmentation, args.fc_output_dim,
                                     args.epochs_num * args.iterations_per_epoch, make_target_batches)) if loss]
    auxiliary_parameters = [p for loss in auxiliary_losses for p in loss.parameters()]
    auxiliary_optimizers = [optimizers.get_optimizer(auxiliary_parameters, args.classifiers_lr, optimizer_settings)] \
        if auxiliary_parameters else []
    schedulers = [optimizers.EpochScheduler(optimizer, schedule_settings)
                  for optimizer in (model_optimizer, *classifiers_optimizers, *auxiliary_optimizers)]
    scaler = torch.amp.GradScaler("cuda", enabled=args.amp == "fp16" and args.device.startswith("cuda"))
    return checkpoints.TrainingState(model, model_optimizer, classifiers, classifiers_optimizers, auxiliary_losses,
                                     auxiliary_optimizers, schedulers, scaler)


def read_losses(run, pending_losses, progress, progress_bar):
    """Reads the pending losses into the epoch's, averaged over the DDP processes (a non-finite loss on any of them
    stops every one with the same message); shows the loss."""
    read = distributed.mean_over_processes(pending_losses.read(), run.world_size, run.args.device)
    checkpoints.check_finite_losses([terms["loss"] for terms in read], progress.epoch_num, progress.iteration,
                                    run.path("last_checkpoint.pth"))
    progress.epoch_losses.extend(read)
    if read and run.is_main:
        progress_bar.set_postfix(loss=f"{np.mean([terms['loss'] for terms in read]):.4f}", refresh=False)


def validate(run, state, val_ds, progress, **epoch_totals):
    """Val recalls of the model at progress's step (with DDP each process extracts its share of the descriptors and
    all get the recalls), recorded in metrics.jsonl with the mean loss terms since the previous record, the training
    speed and peak memory since then (and epoch_totals), and best_model.pth when R@1 beats every validation so far.
    Returns the record."""
    args, model = run.args, state.model
    steps_done = progress.epoch_num * args.iterations_per_epoch + progress.iteration
    images_per_s = (steps_done - run.clock_steps) * args.batch_size * run.world_size / (time.time() - run.clock_start)
    validation_start_time = time.time()
    recalls = test.test(val_ds, model, parser.inference_settings(args), parser.index_settings(args),
                        args.recall_values, world_size=run.world_size, rank=run.rank).recalls
    model.train()
    group_num = progress.epoch_num % args.groups_num
    record, is_best = progress.add_validation(
        recalls, args.recall_values, epoch=progress.epoch_num, iteration=progress.iteration, step=steps_done,
        images_seen=steps_done * args.batch_size * run.world_size, group=group_num,
        lr=state.model_optimizer.param_groups[0]["lr"],
        classifiers_lr=state.classifiers_optimizers[group_num].param_groups[0]["lr"],
        train_images_per_s=images_per_s if steps_done > run.clock_steps else None,
        validation_time_s=time.time() - validation_start_time, peak_memory_mb=devices.peak_memory_mb(args.device),
        run_time_s=time.time() - run.start_time, **epoch_totals)
    if "train_time_s" in epoch_totals:
        record["epoch_time_s"] = epoch_totals["train_time_s"] + record["validation_time_s"]
    speed = f"{record['train_images_per_s']:.1f} images/s, " if record["train_images_per_s"] else ""
    logging.info(f"Epoch {progress.epoch_num:02d} iteration {progress.iteration} ({steps_done} in all): "
                 + ", ".join(f"{k} = {v:.4f}" for k, v in record.items() if k.endswith(("loss", "accuracy")) and v)
                 + f"; {val_ds}: {recalls_to_str(recalls, args.recall_values)}; {speed}validation "
                 f"{record['validation_time_s']:.0f} s, peak memory {record['peak_memory_mb']:.0f} MB")
    if run.is_main:
        run.write_metrics(record)
        if is_best:  # before any checkpoint that counts on it
            checkpoints.atomic_torch_save(model.state_dict(), run.path("best_model.pth"))
    run.restart_clock(steps_done)
    return record


def train_epoch(run, state, training_module, group, train_augmentation, progress, val_ds):
    """Trains the epoch progress.epoch_num from progress.iteration on, validating every --val_every steps and
    checkpointing every --checkpoint_every steps inside it (steps counted over the whole training, as
    --log_every). Returns the training time of the epoch, validations inside it included."""
    args, epoch_start_time = run.args, time.time()
    epoch_num, group_num = progress.epoch_num, progress.epoch_num % args.groups_num
    optimizers_of_step = (state.model_optimizer, state.classifiers_optimizers[group_num], *state.auxiliary_optimizers)
    dataloader = group.loader(args.batch_size, args.seed, epoch_num, progress.iteration, run.rank, run.world_size,
                              args.num_workers, pin_memory=args.device.startswith("cuda"))
    dataloader_iterator = iter(dataloader)
    state.model.train()
    pending_losses = losses_log.PendingLosses()
    progress_bar = tqdm(range(progress.iteration, args.iterations_per_epoch), ncols=100, disable=not run.is_main,
                        initial=progress.iteration, total=args.iterations_per_epoch, desc=f"epoch {epoch_num:02d}")
    for iteration in progress_bar:
        images, targets = next(dataloader_iterator)
        images = images_to_device(images, args.image_size, args.device)
        targets = targets.to(args.device, non_blocking=True)
        step = epoch_num * args.iterations_per_epoch + iteration
        auxiliary_images = [loss.extra_images(images, step).contiguous(memory_format=run.memory_format)
                            for loss in state.auxiliary_losses]
        images = train_augmentation(images).contiguous(memory_format=run.memory_format)
        for optimizer in optimizers_of_step:
            optimizer.zero_grad(set_to_none=True)
        with devices.autocast_context(args.device, args.amp):
            output, auxiliary_values = training_module(images, targets, auxiliary_images)
            loss = torch.nn.functional.cross_entropy(output.float(), targets) + sum(auxiliary_values)
        state.scaler.scale(loss).backward()
        for optimizer in optimizers_of_step:
            state.scaler.step(optimizer)
        state.scaler.update()
        pending_losses.add(loss=loss, **{name: value for aux, aux_value in zip(state.auxiliary_losses,
                                                                               auxiliary_values)
                                         for name, value in aux.logged_terms(aux_value).items()})
        progress.iteration = iteration + 1
        steps_done, epoch_ends = step + 1, iteration + 1 == args.iterations_per_epoch
        if steps_done % args.log_every == 0 or epoch_ends:
            read_losses(run, pending_losses, progress, progress_bar)
            if not run.time_estimated:  # once, at the first read of the losses
                run.time_estimated = True
                commons.log_time_left(time.time() - run.clock_start, run.clock_steps + 1, steps_done,
                                      args.epochs_num * args.iterations_per_epoch - steps_done)
        if args.val_every and steps_done % args.val_every == 0 and not epoch_ends:
            read_losses(run, pending_losses, progress, progress_bar)
            validate(run, state, val_ds, progress)
        if args.checkpoint_every and steps_done % args.checkpoint_every == 0 and not epoch_ends:
            read_losses(run, pending_losses, progress, progress_bar)
            checkpoints.save_training_checkpoint(run.path("last_checkpoint.pth"), state, progress, vars(args),
                                                 run.world_size, run.is_main)
    if run.world_size > 1:
        distributed.check_replicas_in_sync([state.model, state.classifiers[group_num], *state.auxiliary_losses],
                                           run.world_size, epoch_num)
    del dataloader_iterator, dataloader
    return time.time() - epoch_start_time


def test_best_model(run, model, test_sets, progress):
    """Tests the best validated weights (best_model.pth) on each query set of the test set, or the final weights
    when no validation saved any, and writes test_results.json naming the weights tested; with --rerank the
    top --rerank_k are re-ranked by local features; prediction pictures with --num_preds_to_save. With DDP every
    process tests the main one's weights and extracts its share of the descriptors; the main one writes. Returns
    the path of the weights tested."""
    args = run.args

    def load_tested_weights():  # on the main process, which wrote them
        path = run.path("best_model.pth")
        if os.path.exists(path):
            checkpoints.load_model_weights(model, path)
        else:
            path = run.path("last_checkpoint.pth")
            logging.warning(f"No validation saved best_model.pth (every val R@{args.recall_values[0]} was 0): "
                            f"testing the final weights, those of {path}")
        if progress.best_step == 0:
            logging.warning(f"No validation beat the network as loaded (val R@1 {progress.best_val_recall1:.1f} at "
                            "step 0): best_model.pth holds the initial weights (a pretrained body? see --recipe "
                            "finetune)")
        return path, {name: tensor.cpu() for name, tensor in model.state_dict().items()}
    tested_path, weights = distributed.computed_on_main(load_tested_weights, run.world_size, run.is_main)
    model.load_state_dict(weights)
    if args.adabn_folder:
        domain_adaptation.adapt_batchnorm(model, unlabeled_dataset.UnlabeledDataset(
            args.adabn_folder, args.test_image_size, args.test_resize), args.device, args.infer_batch_size,
            args.num_workers)
    index, rerank = parser.index_settings(args), parser.rerank_settings(args)
    rows = []
    for test_ds, tested in test.test_query_sets(test_sets, model, parser.inference_settings(args), index,
                                                args.recall_values, run.world_size, run.rank):
        if not run.is_main:
            continue
        recalls, predictions, reranked = rerank_test(rerank, test_ds, tested.predictions, tested.recalls,
                                                     args.recall_values, args.descriptors_cache)
        rows.append((test_ds, recalls, reranked))
        output_folder = run.output_folder if test_ds is test_sets[0] else \
            run.path(files.label_folder(test_ds.label))  # the first query set's pictures where they always were
        visualizations.save_predictions_report(predictions, test_ds, output_folder, args.num_preds_to_save,
                                               args.save_only_wrong_preds, title=visualizations.results_title(
                                                   test_ds, tested_path, recalls, args.recall_values),
                                               matches=reranked and reranked.top1_matches)
    if run.is_main:
        settings = records.evaluation_settings(index, args.eval_amp, args.test_image_size, args.test_resize,
                                               args.positive_dist_threshold, args.adabn_folder, rerank)
        records.save_test_results(run.path("test_results.json"), rows, tested_path, settings, args.recall_values)
    return tested_path


def main(args):
    """Trains the model of args with CosPlace and tests its best validated weights, in the order of upstream's
    train.py; returns the run folder (None on the other DDP processes)."""
    start_time = time.time()
    torch.backends.cudnn.benchmark = True  # input sizes are fixed during training

    #### Processes (DDP through torchrun: one per GPU; a single process otherwise)
    world_size, rank, args.device = distributed.setup_distributed(args.device)

    #### Logging: only the main process writes (logs, checkpoints)
    run = Run(args, world_size, rank, start_logging(args, world_size, rank), start_time)
    if args.tensorboard and run.is_main:
        run.curves = live_curves.TensorBoardCurves(run.path("tensorboard"))
    commons.make_deterministic(args.seed)
    commons.reuse_freed_memory()

    #### Model
    model = build_model(run)
    logging.info(f"There are {torch.cuda.device_count()} GPUs and {os.cpu_count()} CPUs; training on {args.device}"
                 + (f" with {world_size} processes" if world_size > 1 else ""))

    #### Datasets
    val_ds, test_sets = test_datasets(args)
    rerank = parser.rerank_settings(args)
    if rerank:  # a matcher without its weights fails now, not after the training
        matchers.build_matcher(rerank.name, rerank.keypoints)
    groups = training_groups(args, run)
    initialize_aggregation(args, model, groups[0])

    #### Classifiers (one margin head per group), augmentation, auxiliary losses, their optimizers
    train_augmentation = augmentations.TrainAugmentation(args.augmentations,
                                                         parser.augmentation_defaults(args)).to(args.device)
    state = training_state(args, model, groups, train_augmentation, rank)
    if world_size > 1:  # every module was initialised alike; from here each process draws its own augmentations
        commons.make_deterministic(args.seed + rank)

    #### Resume
    progress = checkpoints.TrainingProgress() if not args.resume_train else checkpoints.resume_training(
        args.resume_train, state, vars(args), world_size, rank, run.output_folder)
    for record in progress.metrics_history if run.is_main else ():  # each run folder holds the whole history
        run.write_metrics(record)

    #### Train / evaluation loop
    logging.info("Start training ...")
    run.restart_clock(progress.epoch_num * args.iterations_per_epoch + progress.iteration)
    if args.val_every and not args.resume_train:  # the curve starts at the model as initialised
        validate(run, state, val_ds, progress)
    compiled_model = torch.compile(model) if args.compile else model
    while progress.epoch_num < args.epochs_num:
        group_num = progress.epoch_num % args.groups_num
        state.classifiers[group_num] = commons.move_with_optimizer(
            state.classifiers[group_num], state.classifiers_optimizers[group_num], args.device)
        training_module = network.ModelWithHead(compiled_model, state.classifiers[group_num], state.auxiliary_losses)
        if world_size > 1:
            training_module = torch.nn.parallel.DistributedDataParallel(training_module)
        train_time = train_epoch(run, state, training_module, groups[group_num], train_augmentation, progress, val_ds)
        state.classifiers[group_num] = commons.move_with_optimizer(
            state.classifiers[group_num], state.classifiers_optimizers[group_num], "cpu")

        #### Evaluation at the end of the epoch; the record gets the epoch's totals
        record = validate(run, state, val_ds, progress, train_time_s=train_time,
                          epoch_loss=float(np.mean([terms["loss"] for terms in progress.epoch_losses])))
        for scheduler in state.schedulers:  # after the record: it logs the lr this epoch trained with
            scheduler.step(record[f"val_R@{args.recall_values[0]}"])
        progress.next_epoch()
        checkpoints.save_training_checkpoint(run.path("last_checkpoint.pth"), state, progress, vars(args),
                                             world_size, run.is_main)

    logging.info(f"Trained for {args.epochs_num:02d} epochs, in total in {time.time() - start_time:.0f} s")

    #### Test the best model on the test set
    tested_path = test_best_model(run, model, test_sets, progress)
    if run.is_main:
        if not args.keep_last_checkpoint and tested_path == run.path("last_checkpoint.pth"):
            logging.info(f"Kept {tested_path} despite --no-keep_last_checkpoint: it holds the weights tested")
        elif not args.keep_last_checkpoint:
            os.remove(run.path("last_checkpoint.pth"))
            logging.info(f"Removed {run.path('last_checkpoint.pth')}: the training has finished "
                         f"(--no-keep_last_checkpoint)")
        logging.info("Experiment finished (without any errors)")
    if run.curves:
        run.curves.close()
    distributed.end_distributed(world_size)
    return run.output_folder


if __name__ == "__main__":
    exit_on_user_error(main, ARGS)
