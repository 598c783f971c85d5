"""Shared fixtures: a tiny synthetic dataset, the real mini dataset (skipped when absent), script runners."""

import glob
import logging
import os
import subprocess
import sys

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SF_XS_NIGHT_MINI = os.path.join(REPO_ROOT, "..", "shared", "data", "sf_xs_night_mini")
LITE0_WEIGHTS = os.path.join(REPO_ROOT, "..", "shared", "weights", "efficientnet_lite0_imagenet_timm.pth")

if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory):
    """40 training classes of 10 images, val and test with 12 places (24 database images, 12 queries), 64 px."""
    from datasets.synthetic import generate_dataset
    folder = str(tmp_path_factory.mktemp("synthetic"))
    return generate_dataset(folder, train_places=40, val_places=12, test_places=12, images_per_train_place=10,
                            view_size=64, seed=0)


def shared_or_skip(path, what):
    """path in ../shared beside the checkout, or a skip saying what is missing (CI and users may not have it)."""
    if not os.path.exists(path):
        pytest.skip(f"{what} not found at {os.path.normpath(path)} (../shared beside the checkout): test skipped")
    return path


@pytest.fixture(scope="session")
def sf_xs_night_mini():
    return shared_or_skip(SF_XS_NIGHT_MINI, "the real-image dataset sf_xs_night_mini")


@pytest.fixture(scope="session")
def lite0_weights():
    return shared_or_skip(LITE0_WEIGHTS, "the ImageNet weights of efficientnet_lite0")


def run_script(script, *args, check=True, timeout=600, env=None):
    """Runs one of the project's scripts in a subprocess (as a user would); fails with its output on error."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    result = subprocess.run([sys.executable, os.path.join(REPO_ROOT, script), *map(str, args)], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and result.returncode != 0:
        pytest.fail(f"{script} {' '.join(map(str, args))} exited with {result.returncode}\n"
                    f"--- stdout ---\n{result.stdout[-5000:]}\n--- stderr ---\n{result.stderr[-5000:]}")
    return result


def undo_logging_setup():
    """Removes the handlers that a script run in this process added to the root logger (its log files) and its
    exception hook, so that the next run's logs do not reach the previous run's files."""
    for handler in list(logging.getLogger().handlers):
        if not type(handler).__module__.startswith("_pytest"):
            logging.getLogger().removeHandler(handler)
            handler.close()
    sys.excepthook = sys.__excepthook__


@pytest.fixture(autouse=True)
def scripts_run_in_process_leave_no_logging():
    yield
    undo_logging_setup()


def train_in_process(*args):
    """Runs train.main in this process with the flags args (a subprocess costs seconds of imports per run); returns
    the run folder. The logging that the run set up (its files, the exception hook) is undone afterwards."""
    import parser
    import train
    try:
        return train.main(parser.parse_arguments("train", [str(arg) for arg in args]))
    finally:
        undo_logging_setup()


def recalls_with_flags(args, dataset, model, **options):
    """test.test of the model on dataset with the evaluation flags of args, as the scripts call it."""
    import parser
    import test
    return test.test(dataset, model, parser.inference_settings(args), parser.index_settings(args), args.recall_values,
                     **options)


def tiny_training_args(dataset_folder, tmp_path, *extra):
    """Flags of a few-second training run on the synthetic dataset."""
    return ["--dataset_folder", dataset_folder, "--groups_num", "1", "--epochs_num", "1", "--iterations_per_epoch", "3",
            "--batch_size", "8", "--image_size", "64", "--pretrained", "none", "--num_workers", "0",
            "--device", "cpu", "--logs_root", os.path.join(tmp_path, "logs"),
            "--cache_folder", os.path.join(tmp_path, "cache"), *extra]


def run_folders(tmp_path, save_dir="default"):
    """The run folders under tmp_path/logs/<save_dir>, oldest first."""
    return sorted(glob.glob(os.path.join(tmp_path, "logs", save_dir, "*")), key=os.path.getmtime)


def pytest_collection_modifyitems(items):
    """Tests on the real images or weights of ../shared are slow (minutes on 2 cores): `-m "not slow"` leaves them out."""
    for item in items:
        if {"sf_xs_night_mini", "lite0_weights"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
