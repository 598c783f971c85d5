"""Bad inputs: each one gives a clear error (or a warning with a count) naming the file and what to do, and the
scripts show it as one line with exit code 1, never a traceback (that goes to debug.log)."""

import glob
import logging
import os
import shutil
import sys
import threading
from multiprocessing import Pool

import numpy as np
import pytest
import torch
from PIL import Image

from training import checkpoints

import parser
from conftest import run_script, tiny_training_args
from core import errors, files, logs
from datasets import test_dataset  # not its TestDataset: pytest would try to collect the class
from datasets.dataset_utils import (
    EXPECTED_FORMAT,
    DatasetError,
    find_images,
    find_queries_folder,
    format_image_name,
    parse_image_name,
    read_utms,
)
from datasets.image_check import check_images, make_image_check
from datasets.image_loading import ImageLoadError
from datasets.listing_cache import load_groups
from datasets.train_dataset import ClassBatchSampler, TrainDataset, check_groups
from model import network


def write_image(folder, east, north, heading=0, name=None, size=32, seed=0):
    """A small JPEG named in the benchmark format (or `name`); returns its path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name or format_image_name(east, north, 10, "S", heading=heading,
                                                          pano_id=f"p{seed}", prefix="t"))
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    return path


def corrupt(path, kind):
    """Cuts the last quarter of a JPEG ('truncated'), replaces it with text ('text') or with nothing ('empty')."""
    data = open(path, "rb").read()
    content = {"truncated": data[:len(data) * 3 // 4], "text": b"this is not an image", "empty": b""}[kind]
    with open(path, "wb") as file:
        file.write(content)
    return path


def write_places(folder, places, images_per_place, spacing=50.0, first_seed=0):
    """places x images_per_place images, each place in its own 10 m cell (one CosPlace group if spacing=50)."""
    paths = []
    for place in range(places):
        for i in range(images_per_place):
            paths.append(write_image(folder, 549000 + 5 + place * spacing, 4180005 + i * 0.1,
                                     seed=first_seed + place * 100 + i))
    return paths


def write_test_set(folder, places=3, queries_offset=0.0):
    """database/ with 2 images per place and queries/ with 1, queries_offset metres east of their place."""
    for place in range(places):
        for i in range(2):
            write_image(os.path.join(folder, "database"), 549005 + place * 100, 4180005 + i, seed=place * 10 + i)
        write_image(os.path.join(folder, "queries"), 549005 + place * 100 + queries_offset, 4180005, seed=place + 500)
    return folder


#### File names

@pytest.mark.parametrize("name, expected", [
    ("photo_0001.jpg", "file name does not follow the '@' format"),
    ("@549000.0@.jpg", "must be numbers"),
    ("@east@4180000.0@10@S@37.7@-122.4@pano@@0@@@@201001@@.jpg", "must be numbers"),
    ("@549000.0@4180000.0@10@S@37.7@-122.4@pano@@north@@@@201001@@.jpg", "must be numbers"),
    ("@inf@4180000.0@10@S@37.7@-122.4@pano@@0@@@@201001@@.jpg", "must be finite"),
])
def test_bad_file_name_names_the_file_and_the_format(name, expected):
    with pytest.raises(DatasetError) as error:
        parse_image_name(os.path.join("some", "folder", name))
    assert os.path.join("some", "folder", name) in str(error.value)
    assert expected in str(error.value) and EXPECTED_FORMAT in str(error.value)


def test_on_bad_name_stops_or_skips_with_a_count(tmp_path, caplog):
    good = [write_image(str(tmp_path), 549005 + i, 4180005, seed=i) for i in range(3)]
    bad = [write_image(str(tmp_path), 0, 0, name=n) for n in ("holiday.jpg", "@x@y@.jpg")]
    paths = sorted(good + bad)
    with pytest.raises(DatasetError, match="holiday.jpg|@x@y@.jpg"):
        read_utms(paths, "error")
    with caplog.at_level(logging.WARNING):
        kept, utms, headings = read_utms(paths, "skip")
    assert kept == sorted(good) and utms.shape == (3, 2) and headings.shape == (3,)
    assert "Skipped 2 of 5 files" in caplog.text and EXPECTED_FORMAT in caplog.text
    with pytest.raises(DatasetError, match=f"None of the 2 files in {tmp_path}"):
        read_utms(sorted(bad), "skip")


#### Folders

def test_missing_or_empty_folders(tmp_path):
    with pytest.raises(DatasetError, match=f"Folder {tmp_path / 'train'} does not exist: a dataset folder holds"):
        find_images(str(tmp_path / "train"))
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "notes.txt").write_text("not an image")
    with pytest.raises(DatasetError, match=f"Folder {tmp_path / 'train'} has no images"):
        find_images(str(tmp_path / "train"))
    with pytest.raises(DatasetError, match=f"Folder {tmp_path / 'train'} has no images"):
        load_groups(str(tmp_path / "train"), 10, 30, 5, 2, 10, str(tmp_path / "cache"))


def test_test_set_without_database_or_queries(tmp_path):
    folder = str(tmp_path / "val")
    os.makedirs(os.path.join(folder, "queries"))
    with pytest.raises(DatasetError, match=f"{folder} has no database/ folder"):
        test_dataset.TestDataset(folder)
    write_image(os.path.join(folder, "database"), 549005, 4180005)
    with pytest.raises(DatasetError, match=f"Folder {os.path.join(folder, 'queries')} has no images"):
        test_dataset.TestDataset(folder)
    shutil.rmtree(os.path.join(folder, "queries"))
    with pytest.raises(DatasetError, match=f"{folder} has no queries folder: expected one of queries, queries_v1"):
        find_queries_folder(folder)
    os.makedirs(os.path.join(folder, "queries_v1"))
    write_image(os.path.join(folder, "queries_v1"), 549005, 4180005)
    os.remove(glob.glob(os.path.join(folder, "database", "*"))[0])
    with pytest.raises(DatasetError, match=f"Folder {os.path.join(folder, 'database')} has no images"):
        test_dataset.TestDataset(folder)


def test_queries_without_positives_are_counted_and_reported(tmp_path, caplog):
    some = write_test_set(str(tmp_path / "some"), places=3)
    far = os.path.join(some, "queries", format_image_name(549005 + 1000, 4180005, 10, "S", pano_id="far", prefix="t"))
    shutil.copy(glob.glob(os.path.join(some, "queries", "*"))[0], far)
    with caplog.at_level(logging.INFO):
        dataset = test_dataset.TestDataset(some, positive_dist_threshold=25)
    assert dataset.queries_without_positives == 1
    assert "1 of 4 queries have no database image within 25 m" in caplog.text
    caplog.clear()
    none = write_test_set(str(tmp_path / "none"), places=2, queries_offset=40)
    with caplog.at_level(logging.WARNING):
        dataset = test_dataset.TestDataset(none, positive_dist_threshold=25)
    assert dataset.queries_without_positives == dataset.queries_num == 2
    assert "no query has a database image within 25 m: every recall will be 0" in caplog.text


#### Classes and groups

def test_no_class_with_enough_images(tmp_path):
    folder = str(tmp_path / "train")
    write_places(folder, places=3, images_per_place=4)
    groups = load_groups(folder, 10, 30, 5, 2, 5, str(tmp_path / "cache"))
    with pytest.raises(DatasetError, match=f"No class of {folder} has at least --min_images_per_class 5 images"):
        check_groups(groups, 1, 5, folder, batch_size=2)


def test_fewer_groups_than_groups_num_and_batch_larger_than_classes(tmp_path):
    folder = str(tmp_path / "train")
    write_places(folder, places=3, images_per_place=2)
    groups = load_groups(folder, 10, 30, 5, 2, 2, str(tmp_path / "cache"))
    assert [len(group) for group in groups] == [3]
    with pytest.raises(DatasetError, match="has 1 group.* but --groups_num is 8: use --groups_num 1"):
        check_groups(groups, 8, 2, folder, batch_size=2)
    with pytest.raises(DatasetError, match="has 3 classes, fewer than the batch size 4 .*at most 3"):
        check_groups(groups, 1, 2, folder, batch_size=4)
    check_groups(groups, 1, 2, folder, batch_size=3)
    with pytest.raises(DatasetError, match="fewer than the batch size 4"):
        ClassBatchSampler([2, 2, 2], batch_size=2, seed=0, epoch=0, world_size=2)


#### Images

def test_check_images_reports_every_bad_file_or_leaves_them_out(tmp_path, caplog):
    folder = str(tmp_path / "train")
    paths = write_places(folder, places=4, images_per_place=3)
    bad = {corrupt(paths[0], "truncated"), corrupt(paths[4], "text"), corrupt(paths[8], "empty")}
    with pytest.raises(ImageLoadError) as error:
        check_images(paths, "error", num_threads=2)
    message = str(error.value)
    assert message.startswith("3 of 12 images cannot be read") and all(p in message for p in bad)
    assert "image file is truncated" in message and "--on_bad_image skip" in message
    with caplog.at_level(logging.WARNING):
        kept = check_images(paths, "skip", num_threads=2)
    assert kept == [p for p in paths if p not in bad]
    assert "Leaving out 3 of 12 images" in caplog.text
    # Left out before the classes are computed: the classes with a bad image now have 2 images, under the minimum
    groups = load_groups(folder, 10, 30, 5, 2, 3, str(tmp_path / "cache"),
                         image_check=make_image_check(True, "skip", num_threads=2))
    assert sorted(p for group in groups for c in group for p in c) == sorted(paths[i] for i in (9, 10, 11))
    with pytest.raises(ImageLoadError, match="3 of 3 images cannot be read: .* Remove them$"):
        check_images(sorted(bad), "skip")


def test_image_check_flags():
    assert make_image_check(False) is None and make_image_check(False, test_set=True) is None
    assert make_image_check(False, "skip") is None and make_image_check(False, "skip", test_set=True) is not None
    assert make_image_check(True) is not None


def test_bad_training_image_stops_or_is_replaced_by_another_of_its_class(tmp_path, caplog):
    paths = write_places(str(tmp_path), places=1, images_per_place=3)
    corrupt(paths[1], "truncated")
    with pytest.raises(ImageLoadError, match=f"{paths[1]}: cannot be read as an image .*--on_bad_image skip"):
        TrainDataset([paths], 16, "error")[(0, 1)]
    dataset = TrainDataset([paths], 16, "skip")
    with caplog.at_level(logging.WARNING):
        image, label = dataset[(0, 1)]
        assert torch.equal(image, dataset[(0, 2)][0]) and label == 0
        dataset[(0, 1)]  # the same file is not reported twice
    assert caplog.text.count(f"Skipping unreadable image {paths[1]}") == 1
    assert "1 skipped so far by this loader process" in caplog.text
    for path in paths:
        corrupt(path, "text")
    with pytest.raises(ImageLoadError, match="No image of class 0 can be read"):
        dataset[(0, 0)]


def test_loader_worker_error_becomes_one_clear_line(tmp_path):
    """DataLoader re-raises a worker's exception with the worker's traceback in its message."""
    paths = write_places(str(tmp_path), places=1, images_per_place=2)
    corrupt(paths[0], "truncated")
    loader = torch.utils.data.DataLoader(TrainDataset([paths], 16, "error"), batch_sampler=[[(0, 0)]], num_workers=1)
    with pytest.raises(ImageLoadError) as error:
        next(iter(loader))
    assert "Traceback" in str(error.value)
    message = errors.user_error_message(error.value)
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith(f"{paths[0]}: cannot be read as an image (image file is truncated")
    assert errors.user_error_message(KeyError("a bug")) is None


def test_user_errors_are_logged_as_one_line_with_the_traceback_in_debug_log(tmp_path, capsys):
    previous_hook, root = sys.excepthook, logging.getLogger()
    previous_handlers, previous_level = list(root.handlers), root.level
    try:
        logs.setup_logging(str(tmp_path), console="debug")
        try:
            raise DatasetError("/data/train: something the user can fix")
        except DatasetError as error:
            sys.excepthook(type(error), error, error.__traceback__)
        try:
            raise ZeroDivisionError("a bug")
        except ZeroDivisionError as error:
            sys.excepthook(type(error), error, error.__traceback__)
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
            handler.close()
        for handler in previous_handlers:
            root.addHandler(handler)
        root.setLevel(previous_level)
        sys.excepthook = previous_hook
    console = capsys.readouterr().out
    assert "ERROR: /data/train: something the user can fix (traceback in" in console
    assert console.count("Traceback (most recent call last)") == 1 and "ZeroDivisionError: a bug" in console
    debug_log = (tmp_path / "debug.log").read_text()
    assert debug_log.count("Traceback (most recent call last)") == 2 and "raise DatasetError" in debug_log
    assert "ERROR: /data/train" in (tmp_path / "info.log").read_text()


#### Checkpoints and flags

def test_bad_checkpoints_are_named_with_what_is_wrong(tmp_path):
    args = parser.parse_arguments("train", ["--dataset_folder", "d", "--pretrained", "none"])
    model = network.GeoLocalizationNet(**parser.model_options(args))
    with pytest.raises(checkpoints.CheckpointError, match=f"{tmp_path / 'missing.pth'}: no such file"):
        checkpoints.load_model_weights(model, str(tmp_path / "missing.pth"))
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    with pytest.raises(checkpoints.CheckpointError, match="notes.pth cannot be read as a PyTorch checkpoint: a damaged or truncated file"):
        checkpoints.load_model_weights(model, str(tmp_path / "notes.pth"))
    torch.save(model.state_dict(), tmp_path / "model.pth")
    data = (tmp_path / "model.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[:len(data) // 2])
    with pytest.raises(checkpoints.CheckpointError, match="truncated.pth cannot be read as a PyTorch checkpoint: a damaged or truncated file"):
        checkpoints.load_model_weights(model, str(tmp_path / "truncated.pth"))
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(checkpoints.CheckpointError, match="list.pth is not a model checkpoint: expected a state dict"):
        checkpoints.load_model_weights(model, str(tmp_path / "list.pth"))
    other_dim = network.GeoLocalizationNet(**parser.model_options(parser.parse_arguments("train", ["--dataset_folder", "d", "--pretrained", "none",
                                                                  "--fc_output_dim", "64"])))
    with pytest.raises(checkpoints.CheckpointError) as error:
        checkpoints.load_model_weights(other_dim, str(tmp_path / "model.pth"))
    assert "does not fit this model (--backbone, --aggregator, --fc_output_dim?)" in str(error.value)
    assert "aggregation.3.weight: checkpoint (512, 512) vs model (64, 512)" in str(error.value)
    other_backbone = torch.nn.Sequential(torch.nn.Linear(2, 2))
    mismatch = checkpoints.state_dict_mismatch(other_backbone, model.state_dict())
    assert "2 keys missing from the checkpoint, e.g. ['0.weight', '0.bias']" in mismatch
    assert "unexpected keys, e.g. ['backbone.0.weight'" in mismatch


@pytest.mark.parametrize("flags, reason", [
    (["--image_size", "16"], "--image_size 16 is too small"),
    (["--resume_train", "a.pth", "--resume_model", "b.pth"], "--resume_train already restores the model"),
    (["--batch_size", "0"], "expected a positive integer, got 0"),
])
def test_parser_refuses_contradictory_flags_with_the_reason(flags, reason, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_arguments("train", ["--dataset_folder", "d", *flags])
    assert exit_info.value.code == 2 and reason in capsys.readouterr().err


#### Output folders

def make_folders(parent, count):
    return [files.make_unique_folder(parent, "2026-01-01_00-00-00") for _ in range(count)]


def test_runs_started_in_the_same_second_never_share_a_folder(tmp_path):
    parent = str(tmp_path / "logs")
    folders = []
    threads = [threading.Thread(target=lambda: folders.extend(make_folders(parent, 5))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with Pool(4) as pool:
        for result in pool.starmap(make_folders, [(parent, 5)] * 4):
            folders.extend(result)
    assert len(folders) == len(set(folders)) == 60 and all(os.path.isdir(f) for f in folders)
    assert sorted(os.listdir(parent)) == sorted(os.path.basename(f) for f in folders)


#### Scripts: one clear line, exit code 1

def assert_clean_failure(result, *expected):
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    error_lines = [line for line in output.splitlines() if "ERROR: " in line]
    assert len(error_lines) == 1, output[-3000:]
    for text in expected:
        assert text in error_lines[0], error_lines[0]
    return error_lines[0]


def test_train_py_reports_a_corrupt_image_met_by_a_loader_worker(synthetic_dataset, tmp_path):
    dataset = str(tmp_path / "dataset")
    shutil.copytree(synthetic_dataset, dataset)
    train_images = sorted(glob.glob(os.path.join(dataset, "train", "*.jpg")))
    for path in train_images:
        corrupt(path, "truncated")
    result = run_script("train.py", *tiny_training_args(dataset, str(tmp_path), "--num_workers", "2",
                                                         "--image_size", "32"), check=False)
    line = assert_clean_failure(result, "cannot be read as an image (image file is truncated",
                                "--on_bad_image skip")
    assert any(path in line for path in train_images)
    debug_log = glob.glob(os.path.join(str(tmp_path), "logs", "default", "*", "debug.log"))[0]
    assert "Traceback" in open(debug_log).read() and debug_log in line


def test_eval_py_reports_a_test_set_without_queries(synthetic_dataset, tmp_path):
    test_set = str(tmp_path / "test")
    shutil.copytree(os.path.join(synthetic_dataset, "test", "database"), os.path.join(test_set, "database"))
    result = run_script("eval.py", "--test_set_folder", test_set, "--pretrained", "none", "--device", "cpu",
                        "--num_workers", "0", "--logs_root", str(tmp_path / "logs"), check=False)
    assert_clean_failure(result, f"{test_set} has no queries folder: expected one of queries, queries_v1")
