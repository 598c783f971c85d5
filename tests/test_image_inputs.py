"""What enters the model from image files and names: 16-bit PNGs, EXIF orientation, test resizing and its batching,
names without a heading, the order of the groups (checked against hand-computed values and numpy/PIL references)."""

import ast
import logging
import os

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TVF
from PIL import Image

import make_dataset
from core.errors import UserError
from datasets import image_loading, normalization
from datasets.dataset_utils import EXPECTED_FORMAT, DatasetError, format_image_name, parse_image_name, read_utms
from datasets.image_loading import (
    ImageListDataset,
    batches_by_size,
    collate_images,
    image_size_of,
    images_to_device,
    load_encoded_image,
    load_image_tensor,
    normalized_batches,
    target_size,
    to_rgb,
)
from datasets.normalization import normalize
from datasets.test_dataset import TestDataset
from datasets.listing_cache import cache_key, load_groups
from datasets.train_dataset import check_groups, compute_groups
from evaluation.descriptors import compute_descriptors

ORIENTATION = 0x0112


def gradient(width, height, seed=0):
    """A smooth, asymmetric RGB image (JPEG keeps it within a few levels): uint8 [H, W, 3]."""
    y, x = np.mgrid[0:height, 0:width]
    phase = np.random.default_rng(seed).uniform(0, 6, 3)
    return np.stack([127 + 100 * np.sin(x / width * 3 + phase[0]) * np.cos(y / height * 2),
                     255 * x / width, 255 * y / height + 0 * phase[2]], axis=2).round().astype(np.uint8)


def save_jpeg(path, array, orientation=None):
    exif = Image.Exif()
    if orientation is not None:
        exif[ORIENTATION] = orientation
    Image.fromarray(array).save(path, quality=95, exif=exif)
    return str(path)


def chw(array):
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)


#### 16-bit images

def sixteen_bit_gradient():
    """Every 16-bit level step of 257 and its neighbours, so rounding and the extremes are covered."""
    values = np.concatenate([np.arange(0, 65536, 257), [1, 128, 129, 385, 386, 65406, 65534]]).astype(np.uint16)
    return np.tile(values, (3, 1))  # [3, 263]


def expected_eight_bits(values):
    """round(v * 255 / 65535) in integers: 65535 = 255 * 257, and v / 257 is never a half."""
    return ((values.astype(np.int64) * 255 + 65535 // 2) // 65535).astype(np.uint8)


def test_sixteen_bit_png_is_scaled_to_eight_bits(tmp_path):
    values = sixteen_bit_gradient()
    path = str(tmp_path / "depth.png")
    Image.fromarray(values).save(path)
    assert Image.open(path).mode in image_loading.WIDE_MODES  # the case of the bug: convert("RGB") made it white
    expected = expected_eight_bits(values)
    assert expected[0, :3].tolist() == [0, 1, 2] and expected[0, -7:].tolist() == [0, 0, 1, 1, 2, 254, 255]
    loaded = load_image_tensor(path)
    assert loaded.shape == (3, 3, values.shape[1])
    for channel in loaded:  # grey: the same in R, G, B
        np.testing.assert_array_equal(channel.numpy(), expected)
    encoded = load_encoded_image(path)  # --decode_on_gpu decodes PNGs in the worker, with the same loader
    np.testing.assert_array_equal(encoded.data.numpy(), loaded.numpy())
    resized = load_image_tensor(path, (40, 2))  # resized after the scaling to 8 bits
    reference = Image.fromarray(expected, "L").convert("RGB").resize((40, 2), Image.BILINEAR)
    np.testing.assert_array_equal(resized.permute(1, 2, 0).numpy(), np.asarray(reference))


@pytest.mark.parametrize("dtype, mode", [("<u2", "I;16"), (">u2", "I;16B"), (np.int32, "I"), (np.float32, "F")])
def test_every_wide_mode_uses_the_sixteen_bit_scale(dtype, mode):
    values = sixteen_bit_gradient()
    image = Image.fromarray(values.astype(dtype))
    assert image.mode == mode
    np.testing.assert_array_equal(np.asarray(to_rgb(image))[..., 1], expected_eight_bits(values))
    out_of_range = Image.fromarray(np.array([[-5, 70000]], dtype=np.int32))  # clipped, not wrapped
    assert np.asarray(to_rgb(out_of_range))[0, :, 0].tolist() == [0, 255]


#### EXIF orientation

def test_exif_orientation_six_is_applied(tmp_path):
    original = gradient(64, 32)
    path = save_jpeg(tmp_path / "phone.jpg", original, orientation=6)
    stored = np.asarray(Image.open(path).convert("RGB"))  # Pillow's plain decode ignores the orientation
    assert stored.shape == (32, 64, 3)
    clockwise = np.rot90(stored, k=-1)  # orientation 6: the stored image must be turned 90 degrees clockwise
    loaded = load_image_tensor(path)
    assert loaded.shape == (3, 64, 32)
    np.testing.assert_array_equal(loaded.numpy(), chw(clockwise).numpy())  # the same decoder, a lossless turn
    error = (loaded.float() - chw(np.rot90(original, k=-1)).float()).abs()
    assert error.mean() < 2 and error.max() < 24  # JPEG's loss only
    assert (loaded.float() - chw(np.rot90(original, k=1)).float()).abs().mean() > 30  # the other turn is far
    assert image_size_of(path) == (32, 64)
    # decode_on_gpu: nvJPEG ignores the orientation, so such a JPEG is decoded by the worker
    encoded = load_encoded_image(path)
    assert encoded.data.dim() == 3
    np.testing.assert_array_equal(encoded.data.numpy(), loaded.numpy())
    upright = load_encoded_image(save_jpeg(tmp_path / "upright.jpg", original))
    assert upright.data.dim() == 1  # bytes, decoded on the device


def test_exif_orientation_with_a_reduced_scale_decode(tmp_path):
    original = gradient(256, 128, seed=1)
    path = save_jpeg(tmp_path / "phone.jpg", original, orientation=6)
    upright = np.rot90(original, k=-1)  # 128 wide, 256 high
    # The target is computed on the upright image: shorter side 32 -> 32 x 64 (w x h), not 64 x 32
    loaded = load_image_tensor(path, 32, "shorter_side")
    assert loaded.shape == (3, 64, 32)
    blocks = upright.reshape(64, 4, 32, 4, 3).mean(axis=(1, 3))  # a 4x box filter, the reference of a 1/4 resize
    assert np.abs(loaded.permute(1, 2, 0).numpy() - blocks).mean() < 3
    square = load_image_tensor(path, 16)
    assert square.shape == (3, 16, 16)
    assert image_size_of(path) == (128, 256)


#### Test resizing and its batching

@pytest.mark.parametrize("width, height, size", [(100, 50, 40), (50, 100, 40), (333, 500, 224), (640, 480, 480),
                                                 (101, 67, 33), (64, 64, 16)])
def test_shorter_side_sizes_are_torchvision_resize_int(width, height, size):
    expected = TVF.resize(torch.zeros(1, height, width), size, antialias=True).shape  # upstream's Resize(int)
    assert target_size((width, height), size, "shorter_side") == (expected[2], expected[1])
    assert target_size((width, height), size, "square") == (size, size)
    assert target_size((width, height), None, "shorter_side") == (width, height)


def test_hundred_by_fifty_image_resized_to_forty(tmp_path):
    array = gradient(100, 50)
    path = str(tmp_path / "wide.png")
    Image.fromarray(array).save(path)
    shorter = ImageListDataset([path], 40)[0][0]
    assert shorter.shape == (3, 40, 80)  # 80 x 40: the shorter side is 40, the aspect ratio kept
    reference = TVF.resize(Image.fromarray(array), 40)  # torchvision Resize(40), as upstream's --resize_test_imgs
    np.testing.assert_array_equal(shorter.permute(1, 2, 0).numpy(), np.asarray(reference))
    square = ImageListDataset([path], 40, test_resize="square")[0][0]
    assert square.shape == (3, 40, 40)
    with pytest.raises(ValueError, match="test_resize must be one of"):
        ImageListDataset([path], 40, test_resize="longer_side")


class SizeAndMeanModel(torch.nn.Module):
    """Descriptors that tell which image came at which size: [mean of each channel, height, width]."""

    def forward(self, images):
        batch, _, height, width = images.shape
        sizes = torch.tensor([height, width], dtype=images.dtype).expand(batch, 2)
        return torch.cat([images.mean(dim=(2, 3)), sizes], dim=1)


@pytest.mark.parametrize("test_resize, image_size, expected_batches", [
    ("shorter_side", 40, [[0, 1, 3], [2]]),  # 80x40, 80x40, 40x80, 80x40
    ("square", 40, [[0, 1, 2, 3]]),
    ("shorter_side", None, [[0], [1], [2], [3]]),  # four original sizes
])
def test_images_are_batched_by_their_resized_size(tmp_path, test_resize, image_size, expected_batches):
    sizes = [(100, 50), (200, 100), (50, 100), (120, 60)]
    paths = []
    for i, (width, height) in enumerate(sizes):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(gradient(width, height, seed=i)).save(paths[-1])
    dataset = ImageListDataset(paths, image_size, test_resize=test_resize)
    assert sorted(map(sorted, batches_by_size(dataset, range(4), batch_size=16))) == expected_batches
    descriptors = compute_descriptors(SizeAndMeanModel(), dataset, "cpu", batch_size=16)
    for i, path in enumerate(paths):
        image = normalize(load_image_tensor(path, image_size, test_resize).unsqueeze(0))
        expected = SizeAndMeanModel()(image)[0].numpy()
        np.testing.assert_allclose(descriptors[i], expected, rtol=1e-5, atol=1e-5)
    assert descriptors[:, 3:].tolist() == [[target_size(s, image_size, test_resize)[1],
                                            target_size(s, image_size, test_resize)[0]] for s in sizes]


def test_decode_on_gpu_path_resizes_the_shorter_side(tmp_path):
    paths = [save_jpeg(tmp_path / f"{i}.jpg", gradient(120, 60, seed=i)) for i in range(2)]
    dataset = ImageListDataset(paths, 30, decode_on_gpu=True)
    batches = list(normalized_batches(dataset, "cpu"))
    assert len(batches) == 1 and batches[0][0].shape == (2, 3, 30, 60)
    images, _ = collate_images([dataset[i] for i in range(2)])
    decoded = images_to_device(images, 30, "cpu", "shorter_side").float()
    reference = torch.stack([load_image_tensor(p, 30, "shorter_side") for p in paths]).float()
    assert decoded.shape == reference.shape and (decoded - reference).abs().mean() < 3


def test_test_dataset_keeps_the_aspect_ratio_by_default(tmp_path):
    for split in ("database", "queries"):
        os.makedirs(tmp_path / split)
        Image.fromarray(gradient(90, 60)).save(tmp_path / split / format_image_name(549000.0, 4180000.0))
    assert TestDataset(str(tmp_path), image_size=30)[0][0].shape == (3, 30, 45)
    assert TestDataset(str(tmp_path), image_size=30, test_resize="square")[1][0].shape == (3, 30, 30)


#### Names without a heading

SHORT_NAME = "@549000.50@4180000.25@10@S@.jpg"  # 5 '@' fields: no field 9


def test_short_names_are_rejected_where_the_heading_is_needed():
    path = os.path.join("train", SHORT_NAME)
    with pytest.raises(DatasetError) as error:
        parse_image_name(path, need_heading=True)
    message = str(error.value)
    assert path in message and "heading (field 9)" in message and EXPECTED_FORMAT in message
    metadata = parse_image_name(path)  # test sets only read fields 1 and 2
    assert (metadata.utm_east, metadata.utm_north, metadata.heading) == (549000.5, 4180000.25, 0.0)
    nine_parts = "@1@2@3@4@5@6@7@.jpg"  # 9 parts once split on '@': field 9 missing
    with pytest.raises(DatasetError, match="too few for the heading"):
        parse_image_name(nine_parts, need_heading=True)
    assert parse_image_name("@1@2@3@4@5@6@7@8@90@.jpg", need_heading=True).heading == 90.0


def test_short_names_in_training_stop_or_are_skipped(tmp_path, caplog):
    folder = tmp_path / "train"
    folder.mkdir()
    good = [format_image_name(549001.0 + i, 4180001.0, heading=10) for i in range(3)]
    for name in good + [SHORT_NAME]:
        (folder / name).touch()  # the classes are computed from the names only
    with pytest.raises(DatasetError, match=f"{SHORT_NAME}: file name has 5 '@' fields"):
        load_groups(str(folder), 10, 30, 5, 2, 1, str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING):
        groups = load_groups(str(folder), 10, 30, 5, 2, 1, str(tmp_path / "cache"), on_bad_name="skip")
    assert groups == [[sorted(str(folder / name) for name in good)]]
    assert "Skipped 1 of 4 files" in caplog.text
    kept, utms, _ = read_utms([str(folder / SHORT_NAME)])  # accepted where only the UTM is read
    assert utms.tolist() == [[549000.5, 4180000.25]]


def test_test_sets_accept_short_names(tmp_path):
    for split in ("database", "queries"):
        os.makedirs(tmp_path / split)
        Image.new("RGB", (8, 8)).save(tmp_path / split / SHORT_NAME)
    dataset = TestDataset(str(tmp_path))
    assert dataset.database_utms.tolist() == [[549000.5, 4180000.25]]
    assert [list(p) for p in dataset.get_positives()] == [[0]]


#### The order of the groups

def hand_built_training_set():
    """M=10, N=5, alpha=30, L=2, at least 2 images per class. East cell c is in group c mod 5 (north and heading 0):
    east 100 (cell 10, group 0): 1 image, a dropped class; east 120 (group 2): 2 images; east 130 and 180 (cells 13 and
    18, group 3): 2 images each; east 150 (cell 15, group 0): 2 images. In the sorted names the kept classes first
    appear as groups 2, 3, 0 (group 0's dropped class at 100 does not count, as upstream); by size group 3 (2 classes)
    comes first, then 0 and 2 (1 class each, by group id)."""
    names = [format_image_name(east, 4180000.0, heading=heading, pano_id=f"p{i}")
             for east, images in ((100.0, 1), (120.0, 2), (130.0, 2), (150.0, 2), (180.0, 2))
             for i, heading in enumerate([0, 10][:images])]
    return sorted(names)


def by_east(names, *easts):
    return [n for n in names if parse_image_name(n).utm_east in easts]


def test_groups_in_upstream_order_and_by_size():
    names = hand_built_training_set()
    metadata = [parse_image_name(n, need_heading=True) for n in names]
    utms = np.array([(m.utm_east, m.utm_north) for m in metadata])
    headings = np.array([m.heading for m in metadata])
    upstream = compute_groups(names, utms, headings, 10, 30, 5, 2, 2)
    assert upstream == [[by_east(names, 120)], [by_east(names, 130), by_east(names, 180)], [by_east(names, 150)]]
    by_size = compute_groups(names, utms, headings, 10, 30, 5, 2, 2, groups_order="size")
    assert by_size == [[by_east(names, 130), by_east(names, 180)], [by_east(names, 150)], [by_east(names, 120)]]
    with pytest.raises(ValueError, match="groups_order must be one of"):
        compute_groups(names, utms, headings, 10, 30, 5, 2, 2, groups_order="largest")


def test_group_order_is_part_of_the_cache_and_of_the_messages(tmp_path):
    folder = tmp_path / "train"
    folder.mkdir()
    names = hand_built_training_set()
    for name in names:
        (folder / name).touch()
    cache = str(tmp_path / "cache")
    paths = sorted(str(folder / n) for n in names)
    assert cache_key(str(folder), paths, 10, 30, 5, 2, 2) != cache_key(str(folder), paths, 10, 30, 5, 2, 2, "size")
    upstream = load_groups(str(folder), 10, 30, 5, 2, 2, cache)
    by_size = load_groups(str(folder), 10, 30, 5, 2, 2, cache, groups_order="size")
    assert [len(g) for g in upstream] == [1, 2, 1] and [len(g) for g in by_size] == [2, 1, 1]
    assert load_groups(str(folder), 10, 30, 5, 2, 2, cache) == upstream  # the cache of each order serves it
    assert load_groups(str(folder), 10, 30, 5, 2, 2, cache, groups_order="size") == by_size
    assert len(os.listdir(cache)) == 2
    with pytest.raises(DatasetError, match=r"\(the first 1, upstream order\) has 1 classes.*--groups_order size"):
        check_groups(upstream, 1, 2, str(folder), batch_size=2)
    check_groups(by_size, 1, 2, str(folder), batch_size=2, groups_order="size")
    with pytest.raises(DatasetError, match=r"\(the 2 largest\) has 1 classes") as error:
        check_groups(by_size, 2, 2, str(folder), batch_size=2, groups_order="size")
    assert "--groups_order" not in str(error.value)


#### make_dataset.py and the normalisation module

def test_make_dataset_reads_photos_with_the_loader_and_raises_user_errors(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    path = save_jpeg(photos / "phone.jpg", gradient(64, 32), orientation=6)
    with open(path, "rb") as file:
        data = file.read()
    (photos / "truncated.jpg").write_bytes(data[:len(data) // 2])
    (tmp_path / "positions.csv").write_text("path,latitude,longitude\nphone.jpg,37.77,-122.42\n"
                                            "truncated.jpg,37.77,-122.42\n")
    out = str(tmp_path / "out")
    outcomes = make_dataset.make_dataset(str(photos), out, str(tmp_path / "positions.csv"))
    reasons = {os.path.basename(source): reason for source, _, reason in outcomes}
    assert reasons["phone.jpg"] == "" and reasons["truncated.jpg"].startswith("unreadable (")
    written = os.path.join(out, next(name for _, name, _ in outcomes if name))
    assert load_image_tensor(written).shape == (3, 64, 32)  # the copy keeps its orientation, applied when loaded
    for call, message in [(lambda: make_dataset.make_dataset(str(photos), out), "--out .* is not empty"),
                          (lambda: make_dataset.find_photos(str(tmp_path / "none")), "no such folder"),
                          (lambda: make_dataset.read_positions_csv(path, str(photos)), "cannot be read|a header")]:
        with pytest.raises(UserError, match=message):
            call()


def test_normalization_is_a_leaf_module_and_normalizes_by_hand():
    with open(normalization.__file__) as file:
        tree = ast.parse(file.read())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported == {"torch"}
    images = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 1, 2)
    expected = [(0 - 0.485) / 0.229, (0.2 - 0.456) / 0.224, (1 - 0.406) / 0.225]
    np.testing.assert_allclose(normalize(images)[0, :, 0, 0].numpy(), expected, rtol=1e-6)
