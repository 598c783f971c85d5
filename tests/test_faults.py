"""Issue 28, the error messages: each fault a user met is one line naming the real cause (the file, the flag) and
what to do, never a misleading one (a corrupt weights file called missing, a read-only folder called full, a folder
called missing) nor a traceback or a hang."""

import errno
import json
import os
import re
import shutil
import socket
import tarfile
import urllib.error
import zipfile

import pytest
import torch
from PIL import Image

from core.errors import UserError
from datasets.image_loading import ImageLoadError, image_size_of, load_encoded_image, load_pil_image


def small_png(path, size=(64, 64)):
    Image.new("RGB", size, (90, 120, 150)).save(path)
    return str(path)


def small_model_checkpoint(path):
    """The state dict of the default architecture (what an args.json of {} describes), saved at path."""
    import parser
    from model import network
    model = network.GeoLocalizationNet(**parser.model_options(parser.parse_arguments("geolocalize", ["--pretrained", "none"])))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(model.state_dict(), path)
    return str(path)


# 4. A corrupt weights file of a learned matcher is not a missing one

@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty torch hub dir, no internet (as tests/test_reranking.py blocks it), kornia's downloads refused."""
    import kornia.core.download as kornia_download

    from reranking import matchers
    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    monkeypatch.setattr(matchers, "internet_reachable", lambda host: False)

    def blocked(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution (network blocked by the test)")
    monkeypatch.setattr(kornia_download, "urlopen", blocked)
    monkeypatch.setattr(socket, "create_connection", blocked)
    return hub / "checkpoints"


def build_disk():
    import kornia.feature as KF
    return KF.DISK.from_pretrained("depth")


def test_a_damaged_matcher_weights_file_is_named_and_not_called_missing(offline_hub):
    from reranking import matchers
    damaged = offline_hub / "depth-save.pth"  # kornia's cache name of the DISK weights
    damaged.write_bytes(b"0123456789")
    with pytest.raises(matchers.WeightsUnavailableError) as error:
        matchers.pretrained("DISK", build_disk, "disk_lightglue")
    message = str(error.value)
    assert "\n" not in message and message.startswith("--rerank disk_lightglue: ")
    assert f"{damaged} (10 bytes), is damaged" in message and "delete it" in message
    assert "cannot be downloaded" not in message and "no connection" not in message
    assert error.value.__cause__ is not None  # the real cause stays in debug.log's traceback
    assert damaged.read_bytes() == b"0123456789"  # kornia's quarantine put it back: the user deletes it


def test_absent_matcher_weights_offline_still_say_no_connection_with_the_cause_chained(offline_hub):
    from reranking import matchers
    with pytest.raises(matchers.WeightsUnavailableError) as error:
        matchers.pretrained("DISK", build_disk, "disk_lightglue")
    message = str(error.value)
    assert f"are not in {offline_hub} and cannot be downloaded (no connection to huggingface.co)" in message
    assert "damaged" not in message and error.value.__cause__ is not None


# 5. Permission denied is not a full disk

@pytest.fixture
def no_free_space(monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10 ** 9, 10 ** 9, 0))


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS, errno.EPERM])
def test_a_read_only_place_reporting_no_free_space_is_read_only_not_full(code, tmp_path, no_free_space):
    from core import files
    path = str(tmp_path / "run" / "args.json")
    message = str(files.unwritable_error(path, PermissionError(code, os.strerror(code), path)))
    assert f"cannot write {path}: {tmp_path} is read-only or not yours ({os.strerror(code)})" in message
    assert "full" not in message


def test_no_space_left_is_a_full_disk(tmp_path, no_free_space):
    from core import files
    path = str(tmp_path / "last_checkpoint.pth")
    message = str(files.unwritable_error(path, OSError(errno.ENOSPC, "No space left on device")))
    assert message.startswith(f"the disk is full: could not write {path} (0 MB free in {tmp_path})")


# 6. Photos over Pillow's pixel limit

def test_an_image_over_pillows_pixel_limit_is_an_image_load_error_naming_it(tmp_path, monkeypatch):
    path = small_png(tmp_path / "huge.png")  # 4096 pixels: over twice the limit below, so Pillow raises
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    for read in (image_size_of, load_pil_image):
        with pytest.raises(ImageLoadError) as error:
            read(path)
        message = str(error.value)
        assert isinstance(error.value, UserError) and "\n" not in message
        assert message.startswith(f"{path}: cannot be read as an image: it is larger than Pillow opens")
        assert "4096 pixels" in message and "downscale it" in message and "--on_bad_image skip" in message


# 8. hubconf.py: a folder without args.json, a corrupt args.json

def test_hub_checkpoint_without_args_json_says_so(tmp_path):
    import hubconf
    checkpoint = small_model_checkpoint(tmp_path / "copied" / "best_model.pth")
    for given in (checkpoint, str(tmp_path / "copied")):
        with pytest.raises(hubconf.HubError) as error:
            hubconf.get_trained_model(checkpoint=given)
        message = str(error.value)
        assert message.startswith(f"{tmp_path / 'copied'} has no args.json") and "run folder of train.py" in message
        assert "does not fit" not in message and "\n" not in message


@pytest.mark.parametrize("content, problem", [('{"backbone": "resnet18",', "is not valid JSON (Expecting"),
                                              ("[1, 2]", "holds a JSON list, not the flags of a run")])
def test_hub_corrupt_args_json_is_a_hub_error_not_a_system_exit(content, problem, tmp_path):
    import hubconf
    checkpoint = small_model_checkpoint(tmp_path / "run" / "best_model.pth")
    (tmp_path / "run" / "args.json").write_text(content)
    with pytest.raises(hubconf.HubError) as error:  # SystemExit(2) ended a notebook's kernel
        hubconf.get_trained_model(checkpoint=checkpoint)
    assert str(error.value).startswith(f"{tmp_path / 'run' / 'args.json'} {problem}")


def test_hub_takes_a_run_folder_for_its_best_model(tmp_path):
    import hubconf
    checkpoint = small_model_checkpoint(tmp_path / "run" / "best_model.pth")
    (tmp_path / "run" / "args.json").write_text(json.dumps({"backbone": "resnet18"}))
    model = hubconf.get_trained_model(checkpoint=str(tmp_path / "run"))
    saved = torch.load(checkpoint, map_location="cpu")
    assert all(torch.equal(model.state_dict()[key], value) for key, value in saved.items()) and not model.training


def test_a_parser_error_reaching_the_hub_is_a_hub_error(tmp_path, monkeypatch):
    import hubconf
    import parser
    checkpoint = small_model_checkpoint(tmp_path / "run" / "best_model.pth")
    (tmp_path / "run" / "args.json").write_text("{}")

    def refuse(*args, **kwargs):
        parser.ArgumentParser().error("--resume_model something is wrong")
    monkeypatch.setattr(parser, "parse_arguments", refuse)
    with pytest.raises(hubconf.HubError, match="--resume_model something is wrong$"):
        hubconf.get_trained_model(checkpoint=checkpoint)


# 9. The smaller ones

def test_a_folder_given_as_resume_model_says_which_checkpoint_to_give(tmp_path):
    from training import checkpoints
    run = tmp_path / "run"
    run.mkdir()
    (run / "best_model.pth").write_bytes(b"")
    with pytest.raises(checkpoints.CheckpointError) as error:
        checkpoints.read_checkpoint(str(run))
    assert str(error.value) == f"{run} is a folder, not a checkpoint: give the checkpoint file inside it " \
                               f"({run / 'best_model.pth'})"


def test_geolocalize_refuses_a_folder_given_as_a_photo(tmp_path, capsys):
    import geolocalize
    with pytest.raises(SystemExit):
        geolocalize.main(["--resume_model", str(tmp_path / "model.pth"), "--database_folder", str(tmp_path),
                          str(tmp_path)])
    error = capsys.readouterr().err
    assert f"{tmp_path}: a folder, not a photo: give photo files (the database images go in --database_folder)" \
        in error and "no such photo" not in error


def test_geolocalize_skips_a_photo_that_is_not_an_image_with_on_bad_image_skip(synthetic_dataset, tmp_path,
                                                                                caplog):
    import geolocalize
    from datasets.dataset_utils import find_images
    checkpoint = small_model_checkpoint(tmp_path / "run" / "best_model.pth")
    database = os.path.join(synthetic_dataset, "test", "database")
    notes = tmp_path / "notes.jpg"
    notes.write_text("not a photo")
    flags = ["--resume_model", checkpoint, "--database_folder", database, "--device", "cpu", "--num_workers", "0",
             "--top_k", "2", "--descriptors_cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out"),
             "--on_bad_image", "skip"]
    photo = find_images(database)[0]
    results = geolocalize.main([*flags, str(notes), photo])
    assert [result["photo"] for result in results] == [photo]
    assert f"Leaving out 1 of 2 images that cannot be read: {notes}" in caplog.text
    with pytest.raises(ImageLoadError, match=f"1 of 1 images cannot be read: {re.escape(str(notes))}"):  # nothing left
        geolocalize.main([*flags, str(notes)])


@pytest.mark.parametrize("content", [b"", b"not an image at all"])
def test_empty_and_non_image_files_suggest_on_bad_image_skip(content, tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_bytes(content)
    for read in (load_pil_image, image_size_of):
        with pytest.raises(ImageLoadError) as error:
            read(str(path))
        message = str(error.value)
        assert message.startswith(f"{path}: cannot be read as an image (") and message.endswith(
            "remove it, or use --on_bad_image skip to skip such files")
        assert ("(an empty file, 0 bytes)" in message) == (content == b"")


def test_a_truncated_download_is_called_truncated_not_a_web_page(tmp_path):
    import download_datasets
    whole, cut = tmp_path / "whole.zip", tmp_path / "sf_xs.zip"
    with zipfile.ZipFile(whole, "w") as archive:
        archive.writestr("sf_xs/train/a.jpg", os.urandom(20000))
    cut.write_bytes(whole.read_bytes()[:10000])
    with pytest.raises(download_datasets.DownloadError) as error:
        download_datasets.check_archive(str(cut))
    message = str(error.value)
    assert message.startswith(f"{cut} (10000 bytes) is a truncated or corrupt zip archive") and "web page" not in message
    assert "delete it and download it again" in message
    # a tar.gz cut short passes tarfile.is_tarfile (its first header is there): extracting it says the same
    whole_tar, cut_tar = tmp_path / "whole.tar.gz", tmp_path / "tokyo_xs.tar.gz"
    with tarfile.open(whole_tar, "w:gz") as archive:
        archive.add(whole, "tokyo_xs/blob")
    cut_tar.write_bytes(whole_tar.read_bytes()[:len(whole_tar.read_bytes()) // 2])
    download_datasets.check_archive(str(cut_tar))
    with pytest.raises(download_datasets.DownloadError, match="is a truncated or corrupt tar archive .*delete it"):
        download_datasets.extract(str(cut_tar), str(tmp_path / "extracted"))


def test_make_dataset_calls_a_listed_non_image_file_not_an_image(tmp_path):
    import make_dataset
    images = tmp_path / "photos"
    images.mkdir()
    small_png(images / "a.png")
    (images / "notes.txt").write_text("hello")
    (tmp_path / "positions.csv").write_text("path,latitude,longitude\na.png,45,7\nnotes.txt,45,7\nmissing.png,45,7\n")
    outcomes = make_dataset.make_dataset(str(images), str(tmp_path / "out"), str(tmp_path / "positions.csv"))
    reasons = {os.path.basename(source): reason for source, _, reason in outcomes}
    assert reasons["a.png"] == ""
    assert reasons["notes.txt"].startswith("not an image Pillow can read here (only .jpg, .jpeg, .png files")
    assert reasons["missing.png"] == "listed in the CSV but not found under --images"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
@pytest.mark.timeout(30)
def test_a_fifo_named_like_an_image_is_refused_not_waited_on(tmp_path):
    from datasets.image_check import check_images
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    for read in (load_pil_image, image_size_of, load_encoded_image):
        with pytest.raises(ImageLoadError, match=f"^{re.escape(str(fifo))}: a FIFO \\(named pipe\\), not an image file; remove it"):
            read(str(fifo))
    good = small_png(tmp_path / "good.png")
    assert check_images([str(fifo), good], on_bad_image="skip") == [good]
