"""Self-supervised losses, DANN and AdaBN, optimizers and schedulers: unit tests in-process, then a few tiny
training runs (each covering several of the new flag values) and a resume that must be exact."""

import functools
import json
import logging
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import augmentations
from training import domain_adaptation
from training import optimizers
import parser
from training import ssl_losses
from training.checkpoints import is_measurement
from conftest import run_folders, run_script, tiny_training_args, train_in_process
from core.errors import UserError
from datasets.image_loading import load_image_tensor
from datasets.normalization import normalize
from datasets.unlabeled_dataset import RandomBatchSampler, UnlabeledDataset, folder_batches


def parse(*flags):
    return parser.parse_arguments("train", argv=["--dataset_folder", "unused", "--image_size", "64", *flags])


#### Self-supervised losses

@pytest.mark.parametrize("name", sorted(ssl_losses.SSL_LOSSES))
def test_ssl_loss_is_positive_and_grows_when_the_views_disagree(name):
    generator = torch.Generator().manual_seed(0)
    descriptors = F.normalize(torch.randn(8, 32, generator=generator))
    close_views = F.normalize(descriptors + 0.05 * torch.randn(8, 32, generator=generator))
    unrelated_views = F.normalize(torch.randn(8, 32, generator=generator))
    labels = torch.arange(8)
    loss = ssl_losses.SSL_LOSSES[name]()
    close, unrelated = loss(descriptors, close_views, labels), loss(descriptors, unrelated_views, labels)
    assert close > 0
    assert unrelated > close


def test_supcon_uses_the_class_labels():
    generator = torch.Generator().manual_seed(0)
    descriptors = F.normalize(torch.randn(8, 32, generator=generator))
    views = F.normalize(descriptors + 0.05 * torch.randn(8, 32, generator=generator))
    loss = ssl_losses.SSL_LOSSES["supcon"]()
    assert loss(descriptors, views, torch.arange(8)) != loss(descriptors, views, torch.arange(8) // 2)


def test_ssl_auxiliary_loss_makes_a_second_view_and_weights_the_loss():
    args = parse("--ssl_loss", "ntxent", "--ssl_weight", "0.5")
    auxiliary = ssl_losses.build_ssl_loss(args.ssl_loss, args.ssl_weight, augmentations.TrainAugmentation(
        args.ssl_augmentations, parser.augmentation_defaults(args)))
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    views = auxiliary.extra_images(images, step=0)
    assert views.shape == (4, 3, 64, 64) and views.dtype == torch.float32
    descriptors = F.normalize(torch.randn(4, 16))
    views_descriptors = F.normalize(torch.randn(4, 16))
    unweighted = ssl_losses.SSL_LOSSES["ntxent"]()(descriptors, views_descriptors, torch.arange(4))
    assert auxiliary(descriptors, views_descriptors, torch.arange(4)) == pytest.approx(0.5 * unweighted.item())
    assert ssl_losses.build_ssl_loss("none", 0.5, None) is None
    assert auxiliary.logged_terms(torch.tensor(0.3)) == {"ssl_loss": torch.tensor(0.3)}


#### DANN

def test_gradient_reversal_is_identity_forward_and_minus_lambda_backward():
    inputs = torch.randn(4, 6, requires_grad=True)
    outputs = domain_adaptation.GradientReversal.apply(inputs, 0.3)
    assert torch.equal(outputs, inputs)
    upstream = torch.randn(4, 6)
    (gradient,) = torch.autograd.grad(outputs, inputs, upstream)
    assert torch.allclose(gradient, -0.3 * upstream)


def test_dann_lambda_schedule():
    for progress in (0.0, 0.1, 0.5, 1.0):
        assert domain_adaptation.dann_lambda(progress) == pytest.approx(2 / (1 + math.exp(-10 * progress)) - 1)
    assert domain_adaptation.dann_lambda(0.0) == 0
    assert domain_adaptation.dann_lambda(1.0) == pytest.approx(0.99991, abs=1e-5)


def test_dann_trains_the_domain_classifier_and_reverses_its_gradient(synthetic_dataset):
    args = parse("--da_target_folder", os.path.join(synthetic_dataset, "test", "queries"), "--batch_size", "4",
                 "--num_workers", "0", "--epochs_num", "2", "--iterations_per_epoch", "5")
    make_target_batches = functools.partial(folder_batches, args.da_target_folder, 64, args.batch_size, args.seed)
    dann = domain_adaptation.build_dann(args.da_target_folder, args.da_weight, normalize, 16,
                                        args.epochs_num * args.iterations_per_epoch, make_target_batches)
    target_images = dann.extra_images(torch.zeros(4, 3, 64, 64, dtype=torch.uint8), step=5)
    assert target_images.shape == (4, 3, 64, 64)
    assert dann.lambda_ == pytest.approx(domain_adaptation.dann_lambda(0.5))
    descriptors = torch.randn(4, 16, requires_grad=True)
    loss = dann(descriptors, torch.randn(4, 16), torch.arange(4))
    loss.backward()
    # The classifier learns to separate the domains; the descriptors get the opposite gradient, scaled by lambda
    classifier_gradient = torch.autograd.grad(
        dann.weight * F.binary_cross_entropy_with_logits(dann.domain_classifier(descriptors).squeeze(1),
                                                         torch.zeros(4), reduction="sum") / 8, descriptors)[0]
    assert torch.allclose(descriptors.grad, -dann.lambda_ * classifier_gradient, atol=1e-6)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in dann.domain_classifier.parameters())


def test_dann_logs_its_target_folder_and_refuses_a_missing_one(synthetic_dataset, tmp_path, caplog):
    """The log shows a wrong or near-empty target folder at once; a missing one is named by its flag."""
    folder = os.path.join(synthetic_dataset, "test", "queries")
    caplog.set_level(logging.INFO)
    domain_adaptation.build_dann(folder, 0.1, normalize, 16, 10, make_target_batches=None)
    assert f"DANN: target domain {folder} ({len(os.listdir(folder))} images), weight 0.1" in caplog.messages
    assert len(os.listdir(folder)) == 12  # the fixture's test queries
    missing = str(tmp_path / "missing")
    with pytest.raises(UserError, match=f"^--da_target_folder {missing} does not exist: give a folder") as error:
        domain_adaptation.build_dann(missing, 0.1, normalize, 16, 10, make_target_batches=None)
    assert "\n" not in str(error.value)


def test_target_batches_depend_only_on_the_step():
    uninterrupted = iter(RandomBatchSampler(20, 4, seed=0))
    batches = [next(uninterrupted) for _ in range(6)]
    assert next(iter(RandomBatchSampler(20, 4, seed=0, start_step=5))) == batches[5]
    assert batches[0] != batches[1]


#### AdaBN

def write_images(folder, count, size=32, seed=0):
    """A strong colour shift, so that the target statistics are far from (0, 1); the second half of the images is
    darker, so that batches of the first and of the second half differ."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        shift = np.array([120, 30, 0] if i < count // 2 else [60, 0, 0], dtype=np.uint8)
        pixels = rng.integers(0, 120, (size, size, 3)).astype(np.uint8) + shift
        Image.fromarray(pixels).save(os.path.join(folder, f"target_{i}.png"))
    return folder


def test_adabn_sets_the_batchnorm_statistics_to_the_target_ones(tmp_path):
    """Over batches of 2 of 4 images: the statistics of all the images, not the average of the batches' ones."""
    folder = write_images(str(tmp_path / "target"), count=4)
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(3)).eval()
    domain_adaptation.adapt_batchnorm(model, UnlabeledDataset(folder), "cpu", batch_size=2)
    images = normalize(torch.stack([load_image_tensor(os.path.join(folder, f"target_{i}.png")) for i in range(4)]))
    batch_vars = [images[i: i + 2].var(dim=(0, 2, 3), unbiased=True) for i in (0, 2)]
    bn = model[0]
    assert torch.allclose(bn.running_mean, images.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(bn.running_var, images.var(dim=(0, 2, 3), unbiased=True), atol=1e-5)
    assert not torch.allclose(bn.running_var, (batch_vars[0] + batch_vars[1]) / 2, atol=1e-3)  # would be wrong
    assert bn.momentum == 0.1 and not model.training and not bn.training


def test_adabn_on_a_single_batch_gives_the_exact_statistics(tmp_path):
    folder = write_images(str(tmp_path / "target"), count=3, seed=1)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.BatchNorm2d(3)).train()
    domain_adaptation.adapt_batchnorm(model, UnlabeledDataset(folder, 16, "square"), "cpu", batch_size=8)
    images = normalize(torch.stack([load_image_tensor(os.path.join(folder, f"target_{i}.png"), 16)
                                    for i in range(3)]))
    with torch.no_grad():
        features = model[0](images)
    assert torch.allclose(model[1].running_mean, features.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(model[1].running_var, features.var(dim=(0, 2, 3), unbiased=True), atol=1e-5)
    assert model.training and model[0].training  # the mode is restored


#### Optimizers and schedulers

@pytest.mark.parametrize("name", sorted(optimizers.OPTIMIZERS))
def test_each_optimizer_builds_and_steps(name):
    parameter = torch.nn.Parameter(torch.ones(3))
    optimizer = optimizers.get_optimizer([parameter], 0.1, parser.optimizer_settings(
        parse("--optimizer", name, "--weight_decay", "0.01")))
    parameter.sum().backward()
    optimizer.step()
    assert parameter.data.lt(1).all()
    assert optimizer.param_groups[0]["weight_decay"] == 0.01


def test_unknown_optimizer_and_scheduler_are_refused(capsys):
    for flag, value in (("--optimizer", "lion"), ("--scheduler", "onecycle"), ("--ssl_loss", "byol")):
        with pytest.raises(parser.FlagError, match=f"{flag} {value} is unknown: choose one of"):
            parse(flag, value)
    with pytest.raises(ValueError, match="Unknown --optimizer"):
        optimizers.get_optimizer([torch.nn.Parameter(torch.ones(1))], 0.1, optimizers.OptimizerSettings("lion"))
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    with pytest.raises(ValueError, match="Unknown --scheduler"):
        optimizers.EpochScheduler(optimizer, optimizers.ScheduleSettings("onecycle"))


def epoch_lrs(flags, val_recalls, base_lr=0.1):
    """The lr of each epoch, as train.py sets it: one step per epoch after validation."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=base_lr)
    scheduler = optimizers.EpochScheduler(optimizer, parser.schedule_settings(parse(*flags)))
    lrs = []
    for recall in val_recalls:
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step(recall)
    return lrs


def test_warmup_then_cosine_follows_the_formula():
    warmup, epochs = 2, 7
    lrs = epoch_lrs(["--scheduler", "cosine", "--warmup_epochs", str(warmup), "--epochs_num", str(epochs)],
                    [0] * epochs)
    expected = [0.1 * (e + 1) / (warmup + 1) if e < warmup else
                0.1 * 0.5 * (1 + math.cos(math.pi * (e - warmup) / (epochs - warmup))) for e in range(epochs)]
    assert lrs == pytest.approx(expected)


@pytest.mark.parametrize("flags, recalls, expected", [
    (["--scheduler", "none"], [0] * 3, [0.1] * 3),
    (["--scheduler", "none", "--warmup_epochs", "3"], [0] * 5, [0.025, 0.05, 0.075, 0.1, 0.1]),
    (["--scheduler", "step", "--scheduler_step_size", "2", "--scheduler_gamma", "0.5", "--warmup_epochs", "1"],
     [0] * 6, [0.05, 0.1, 0.1, 0.05, 0.05, 0.025]),
    (["--scheduler", "plateau", "--scheduler_patience", "1", "--scheduler_gamma", "0.5"],
     [10, 20, 20, 20, 30, 30, 30], [0.1, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05]),
])
def test_schedules(flags, recalls, expected):
    assert epoch_lrs(flags, recalls) == pytest.approx(expected)


@pytest.mark.parametrize("name", sorted(optimizers.SCHEDULES))
def test_scheduler_state_resumes_exactly(name):
    flags = ["--scheduler", name, "--warmup_epochs", "1", "--epochs_num", "6", "--scheduler_step_size", "1",
             "--scheduler_patience", "0"]
    recalls = [5, 4, 3, 6, 2, 1]

    def make():
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
        return optimizer, optimizers.EpochScheduler(optimizer, parser.schedule_settings(parse(*flags)))

    optimizer, scheduler = make()
    for recall in recalls[:3]:
        optimizer.step()
        scheduler.step(recall)
    resumed_optimizer, resumed_scheduler = make()
    resumed_optimizer.load_state_dict(optimizer.state_dict())
    resumed_scheduler.load_state_dict(scheduler.state_dict())
    for recall in recalls[3:]:
        for each_optimizer, each_scheduler in ((optimizer, scheduler), (resumed_optimizer, resumed_scheduler)):
            each_optimizer.step()
            each_scheduler.step(recall)
        assert resumed_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]


#### Training runs: each covers several new flag values (few iterations, CPU, 64 px)

def read_metrics(run_folder):
    with open(os.path.join(run_folder, "metrics.jsonl")) as file:
        return [json.loads(line) for line in file]


def queries(dataset):
    return os.path.join(dataset, "test", "queries")


FAST = ["--iterations_per_epoch", "2", "--image_size", "32", "--test_image_size", "32"]  # a third less CPU than 64 px


TRAINING_CASES = {
    "adam-cosine-warmup-vicreg-perspective-erasing": (
        ["--scheduler", "cosine", "--warmup_epochs", "1", "--epochs_num", "2", "--ssl_loss", "vicreg",
         "--augmentations", "random_perspective", "random_erasing", "random_resized_crop"],
        [(0.5e-5, 0.005), (1e-5, 0.01)]),
    "adamw-plateau-ntxent-flip-blur-grayscale": (
        ["--optimizer", "adamw", "--weight_decay", "0.01", "--scheduler", "plateau", "--ssl_loss", "ntxent",
         "--augmentations", "horizontal_flip", "--ssl_augmentations", "gaussian_blur", "grayscale"],
        [(1e-5, 0.01)]),
    "asgd-dann-adabn-night": (
        ["--optimizer", "asgd", "--da_target_folder", queries, "--adabn_folder", queries,
         "--augmentations", "night", "color_jitter", "random_resized_crop"],
        [(1e-5, 0.01)]),
}


@pytest.mark.parametrize("case", sorted(TRAINING_CASES))
def test_training_run(synthetic_dataset, tmp_path, case):
    flags, expected_lrs = TRAINING_CASES[case]
    flags = [flag(synthetic_dataset) if callable(flag) else flag for flag in flags]
    run_folder = train_in_process(*tiny_training_args(synthetic_dataset, tmp_path, *FAST, *flags))
    metrics = read_metrics(run_folder)
    lrs = [(m["lr"], m["classifiers_lr"]) for m in metrics]
    assert np.allclose(lrs, expected_lrs, rtol=1e-6, atol=0), lrs
    assert all(math.isfinite(m["loss"]) for m in metrics)
    assert os.path.isfile(os.path.join(run_folder, "test_results.json"))
    checkpoint = torch.load(os.path.join(run_folder, "last_checkpoint.pth"), map_location="cpu", weights_only=False)
    with_dann = "--da_target_folder" in flags
    assert len(checkpoint["schedulers_state_dict"]) == 2 + with_dann  # model, the only group's head, DANN's
    if with_dann:
        with open(os.path.join(run_folder, "info.log")) as file:
            assert "AdaBN: recomputed the statistics of 20 BatchNorm layers" in file.read()
        (dann_state,) = checkpoint["auxiliary_losses_state_dict"]
        assert "domain_classifier.0.weight" in dann_state
        assert len(checkpoint["auxiliary_optimizers_state_dict"]) == 1


def test_eval_with_adabn(synthetic_dataset, tmp_path):
    import eval
    from model import network
    model_path = str(tmp_path / "model.pth")
    torch.save(network.GeoLocalizationNet(**parser.model_options(parse("--pretrained", "none"))).state_dict(), model_path)
    eval.main(["--resume_model", model_path, "--test_set_folder", os.path.join(synthetic_dataset, "test"),
               "--pretrained", "none", "--num_workers", "0", "--device", "cpu", "--logs_root", str(tmp_path / "logs"),
               "--adabn_folder", queries(synthetic_dataset)])
    (log_folder,) = run_folders(tmp_path)
    with open(os.path.join(log_folder, "info.log")) as file:
        assert "AdaBN: recomputed the statistics of 20 BatchNorm layers on < queries - 12 unlabeled images >" \
               in file.read()


def test_resume_with_new_optimizer_scheduler_and_ssl_is_exact(synthetic_dataset, tmp_path):
    flags = [*FAST, "--optimizer", "sgd", "--scheduler", "step", "--scheduler_step_size", "1",
             "--scheduler_gamma", "0.5", "--ssl_loss", "supcon"]
    uninterrupted_logs, interrupted_logs = tmp_path / "uninterrupted", tmp_path / "interrupted"
    uninterrupted = train_in_process(*tiny_training_args(synthetic_dataset, uninterrupted_logs, *flags,
                                                         "--epochs_num", "2"))
    first_part = train_in_process(*tiny_training_args(synthetic_dataset, interrupted_logs, *flags, "--epochs_num", "1"))
    resumed = train_in_process(*tiny_training_args(synthetic_dataset, interrupted_logs, *flags, "--epochs_num", "2",
                                                   "--resume_train", os.path.join(first_part, "last_checkpoint.pth")))
    drop_times = lambda metrics: [{k: v for k, v in m.items() if not is_measurement(k)} for m in metrics]
    expected = drop_times(read_metrics(uninterrupted))
    assert drop_times(read_metrics(resumed)) == expected
    assert [m["lr"] for m in expected] == pytest.approx([1e-5, 0.5e-5])
    assert [m["classifiers_lr"] for m in expected] == pytest.approx([0.01, 0.005])
