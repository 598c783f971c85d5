"""The fast paths compute what the slow ones do: loading (ours, --decode_on_gpu's byte path, upstream's),
batched augmentation (against torchvision per image), batched query inference, approximate kNN indexes,
the descriptor cache and the pre-resized training copy. No timing here: benchmarks/bench.py measures."""

import logging
import os
import shutil

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

import augmentations
import parser
from benchmarks import naive_pipeline
from conftest import recalls_with_flags
from datasets import preresize
from datasets.dataset_utils import find_images
from datasets.image_loading import (
    ImageLoadError,
    collate_images,
    images_to_device,
    load_encoded_image,
    load_image_tensor,
)
from datasets.normalization import normalize
from datasets.synthetic import generate_dataset
from datasets.test_dataset import TestDataset
from datasets.train_dataset import ClassBatchSampler, TrainDataset
from evaluation import descriptors
from retrieval import faiss_indexes
from retrieval.recalls import compute_recalls
from model import network


@pytest.fixture(scope="module")
def large_images(tmp_path_factory):
    """Training images of 160 px (larger than the 96 px the tests load them at)."""
    folder = str(tmp_path_factory.mktemp("large"))
    generate_dataset(folder, train_places=3, val_places=1, test_places=1, images_per_train_place=2, view_size=160)
    return os.path.join(folder, "train")


def eval_args(dataset_folder, *extra):
    args = parser.parse_arguments("eval", argv=["--dataset_folder", dataset_folder, "--pretrained", "none",
                                                           "--num_workers", "0", "--device", "cpu", *extra])
    return args


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return network.GeoLocalizationNet(**parser.model_options(eval_args("-"))).eval()


#### Loading

@pytest.mark.parametrize("size", [160, 96])
def test_ours_naive_and_byte_paths_load_the_same_training_images(large_images, size):
    paths = find_images(large_images)
    ours = torch.stack([load_image_tensor(path, size) for path in paths]).float() / 255
    naive_dataset = naive_pipeline.NaiveTrainDataset([paths])  # full size; upstream's crop at scale 1 is this resize
    naive = torch.stack([naive_dataset[(0, i)][0] for i in range(len(paths))])
    naive = naive if size == 160 else TF.resize(naive, [size, size], antialias=True)
    encoded, _ = collate_images([(load_encoded_image(path, size), 0) for path in paths])
    decoded = images_to_device(encoded, size, "cpu").float() / 255
    assert ours.shape == naive.shape == decoded.shape == (len(paths), 3, size, size)
    if size == 160:  # no resize: the same libjpeg decoding
        assert torch.equal(ours, naive) and torch.equal(ours, decoded)
    else:  # Pillow's draft-mode (DCT-scaled) decoding against full decoding + antialiased resize
        assert (ours - naive).abs().mean() < 0.02 and (ours - decoded).abs().mean() < 0.02


def test_byte_path_through_loader_workers(synthetic_dataset):
    """A batch of file bytes crosses from the workers as one shared block (a tensor per file would need a file
    descriptor each), and is decoded to the images of the decoding path."""
    classes = [[path] for path in find_images(os.path.join(synthetic_dataset, "train"))[:64]]
    dataset = TrainDataset(classes, 48, decode_on_gpu=True)
    sampler = ClassBatchSampler([1] * len(classes), 32, seed=0, epoch=0)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=2, collate_fn=collate_images)
    for _, (images, targets) in zip(range(4), loader):
        decoded = images_to_device(images, 48, "cpu")
        assert decoded.shape == (32, 3, 48, 48) and decoded.dtype == torch.uint8
        expected = torch.stack([load_image_tensor(classes[t][0], 48) for t in targets.tolist()])
        assert (decoded.float() - expected.float()).abs().mean() < 3


def test_test_images_are_normalised_as_upstream(synthetic_dataset):
    dataset = TestDataset(os.path.join(synthetic_dataset, "val"))
    naive_dataset = naive_pipeline.NaiveTestDataset(dataset)
    for index in (0, len(dataset) - 1):
        ours = normalize(dataset[index][0].unsqueeze(0))[0]
        assert torch.allclose(ours, naive_dataset[index][0], atol=1e-5)


def test_byte_path_decodes_other_formats_in_the_worker_and_names_corrupt_jpegs(large_images, tmp_path):
    jpeg = find_images(large_images)[0]
    png = str(tmp_path / "image.png")
    TF.to_pil_image(load_image_tensor(jpeg)).save(png)
    encoded_png = load_encoded_image(png, 96)
    assert encoded_png.data.shape == (3, 96, 96)  # decoded by the worker
    truncated = str(tmp_path / "truncated.jpg")
    with open(jpeg, "rb") as source, open(truncated, "wb") as target:
        target.write(source.read()[:300])
    images, _ = collate_images([(load_encoded_image(p, 96), 0) for p in (jpeg, png, truncated)])
    with pytest.raises(ImageLoadError, match="truncated.jpg"):
        images_to_device(images, 96, "cpu")
    images, _ = collate_images([(load_encoded_image(p, 96), 0) for p in (jpeg, png)])
    assert images_to_device(images, 96, "cpu").shape == (2, 3, 96, 96)


#### Augmentation: batched, with torchvision's results

def test_batched_color_jitter_is_torchvision_per_image():
    torch.manual_seed(0)
    images = torch.rand(6, 3, 24, 24)
    images[0] = 0.5  # grey pixels: no hue
    jitter = augmentations.ColorJitter(0.7, 0.7, 0.7, 0.5)
    torch.manual_seed(1)
    augmented = jitter(images)
    torch.manual_seed(1)  # replay the draws: the order, then the factors of each operation in that order
    order = torch.randperm(4).tolist()
    ranges = [(0.3, 1.7), (0.3, 1.7), (0.3, 1.7), (-0.5, 0.5)]
    factors = {i: torch.empty(len(images)).uniform_(*ranges[i]) for i in order}
    operations = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for image, result, n in zip(images, augmented, range(len(images))):
        for i in order:
            image = operations[i](image, float(factors[i][n]))
        assert torch.allclose(result, image, atol=1e-5)


def test_batched_random_resized_crop_is_torchvision_resized_crop():
    crop = augmentations.RandomResizedCrop(48, scale=(0.5, 1.0))
    torch.manual_seed(0)
    boxes = crop.crop_boxes(48, 40, 200)
    tops, lefts, heights, widths = boxes.T
    assert (tops >= 0).all() and (lefts >= 0).all() and (tops + heights <= 48).all() and (lefts + widths <= 40).all()
    areas = (heights * widths).float() / (48 * 40)
    assert areas.min() >= 0.45 and areas.max() <= 1  # the scale range, up to rounding
    images = torch.rand(3, 3, 48, 40)
    torch.manual_seed(1)
    cropped = crop(images)  # on the CPU: crop_each
    torch.manual_seed(1)
    boxes = crop.crop_boxes(48, 40, 3)
    all_at_once = crop.crop_all(images, boxes)  # the path of the other devices
    for image, result, one_call, (top, left, height, width) in zip(images, cropped, all_at_once, boxes.tolist()):
        expected = TF.resized_crop(image, top, left, height, width, [48, 48], antialias=True)
        assert torch.allclose(result, expected, atol=1e-6)
        # Inside the crop the same bilinear pixels; the outermost ring may blend in the pixels beyond the crop
        assert torch.allclose(one_call[:, 1:-1, 1:-1], expected[:, 1:-1, 1:-1], atol=1e-5)


#### Evaluation

def test_batched_queries_give_the_recalls_of_one_by_one(synthetic_dataset, model):
    dataset = TestDataset(os.path.join(synthetic_dataset, "val"))
    args = eval_args(synthetic_dataset, "--infer_batch_size", "8")
    tested = recalls_with_flags(args, dataset, model)
    recalls, batched = tested.recalls, tested.descriptors
    one_by_one = naive_pipeline.naive_descriptors(model, dataset, "cpu", batch_size=1, num_workers=0)
    assert np.allclose(batched, one_by_one, atol=1e-4)
    exact = faiss_indexes.knn_search(one_by_one[:dataset.database_num], one_by_one[dataset.database_num:], 20)
    assert np.array_equal(recalls, compute_recalls(exact, dataset.get_positives(), args.recall_values))


def test_frozen_cpu_inference_gives_the_eager_descriptors_at_every_size(synthetic_dataset, model, monkeypatch):
    monkeypatch.setattr(descriptors, "FREEZE_MIN_PIXELS", 0)
    images = torch.rand(3, 3, 64, 80)
    forward = descriptors.InferenceForward(model.eval(), "cpu", "none", 3)
    with torch.inference_mode():
        forward(images)  # the first batch chooses
    frozen = forward.forward
    assert isinstance(frozen, descriptors.FrozenForCpu) and frozen.frozen is not None
    with torch.inference_mode():
        for size in ((64, 80), (48, 96)):  # the size traced, and another one
            batch = torch.rand(3, 3, *size)
            assert torch.allclose(frozen(batch), model(batch), atol=1e-5)
        assert frozen.frozen is not None and frozen.checked_shapes == {(3, 64, 80), (3, 48, 96)}


def test_a_model_whose_trace_keeps_a_size_runs_eagerly(monkeypatch):
    class SizeKeptAsConstant(torch.nn.Module):  # a trace records the reshape's sizes as numbers
        def forward(self, x):
            return x.reshape(x.shape[0], int(x.shape[1] * x.shape[2] * x.shape[3])).cumsum(1)[:, :8] \
                + torch.arange(x.shape[3] * 0 + 8)
    model = SizeKeptAsConstant()
    frozen = descriptors.FrozenForCpu(model, torch.rand(2, 3, 8, 8))
    with torch.inference_mode():
        for size in ((8, 8), (8, 16)):
            batch = torch.rand(2, 3, *size)
            assert torch.equal(frozen(batch), model(batch))
    assert frozen.frozen is None  # found out at the second size: eager from there on


@pytest.mark.parametrize("kind, options", [("hnsw", {"ef_search": 512}), ("ivfpq", {"nlist": 8, "nprobe": 8,
                                                                                     "pq_m": 32})])
def test_approximate_indexes_find_the_exact_neighbours_with_enough_probes(kind, options):
    rng = np.random.default_rng(0)
    database = rng.normal(size=(600, 64)).astype(np.float32)
    database /= np.linalg.norm(database, axis=1, keepdims=True)
    queries = database[rng.permutation(600)[:50]] + 0.01 * rng.normal(size=(50, 64)).astype(np.float32)
    exact = faiss_indexes.knn_search(database, queries, 5)
    approximate = faiss_indexes.knn_search(database, queries, 5, kind=kind, **options)
    if kind == "hnsw":  # the vectors themselves: the whole ranking
        assert np.array_equal(approximate, exact)
    else:  # compressed vectors: the nearest one
        assert np.array_equal(approximate[:, 0], exact[:, 0])


def test_approximate_evaluation_logs_its_size_and_recall_loss(synthetic_dataset, model, caplog, capfd):
    """...and FAISS's warnings about a database too small to train it (one per sub-quantizer) become one line."""
    dataset = TestDataset(os.path.join(synthetic_dataset, "val"))
    args = eval_args(synthetic_dataset, "--faiss_index", "ivfpq", "--faiss_pq_m", "16")
    with caplog.at_level(logging.INFO):
        recalls = recalls_with_flags(args, dataset, model).recalls
    message = next(r.getMessage() for r in caplog.records if "ivfpq index" in r.getMessage())
    assert "MB" in message and "recall loss (exact - approximate): R@1" in message
    summaries = [r.getMessage() for r in caplog.records if r.getMessage().startswith("FAISS printed")]
    assert len(summaries) == 1 and "WARNING clustering" not in capfd.readouterr().err
    assert len(recalls) == 4


def test_descriptors_cache_hits_with_the_same_model_and_misses_otherwise(synthetic_dataset, model, tmp_path,
                                                                       monkeypatch):
    computed = []
    compute = descriptors.compute_descriptors
    monkeypatch.setattr(descriptors, "compute_descriptors", lambda *a, **k: computed.append(1) or compute(*a, **k))
    dataset = TestDataset(os.path.join(synthetic_dataset, "val"))
    args = eval_args(synthetic_dataset, "--descriptors_cache", str(tmp_path / "descriptors"))
    first = descriptors.dataset_descriptors(dataset, model, parser.inference_settings(args))
    second = descriptors.dataset_descriptors(dataset, model, parser.inference_settings(args))
    assert len(computed) == 1 and np.array_equal(first, second)
    other_model = network.GeoLocalizationNet(**parser.model_options(eval_args("-"))).eval()
    other_model.load_state_dict(model.state_dict())
    with torch.no_grad():
        other_model.aggregation[-2].bias[0] += 1e-3  # one weight changed
    descriptors.dataset_descriptors(dataset, other_model, parser.inference_settings(args))
    assert len(computed) == 2
    args.infer_batch_size, args.test_image_size = 4, 48  # the batch size does not matter, the image size does
    descriptors.dataset_descriptors(TestDataset(os.path.join(synthetic_dataset, "val"), image_size=48), model,
                                    parser.inference_settings(args))
    assert len(computed) == 3
    assert len(os.listdir(tmp_path / "descriptors")) == 3


#### Pre-resized training copy

def test_preresized_copy_keeps_names_resizes_once_and_is_never_stale(large_images, tmp_path):
    source = str(tmp_path / "train")
    shutil.copytree(large_images, source)
    copy = preresize.preresize_folder(source, 96, str(tmp_path / "cache"))
    names = sorted(os.path.relpath(p, source) for p in find_images(source))
    assert sorted(os.path.relpath(p, copy) for p in find_images(copy)) == names
    first = os.path.join(copy, names[0])
    assert load_image_tensor(first).shape == (3, 96, 96)
    assert (load_image_tensor(first, 96).float() - load_image_tensor(os.path.join(source, names[0]), 96).float()
            ).abs().mean() < 3  # JPEG re-encoding at quality 95
    written_at = os.path.getmtime(first)
    assert preresize.preresize_folder(source, 96, str(tmp_path / "cache")) == copy
    assert os.path.getmtime(first) == written_at  # found, not rewritten
    assert preresize.preresize_folder(source, 128, str(tmp_path / "cache")) != copy  # another size, another copy
    os.utime(os.path.join(source, names[0]), ns=(0, 0))  # an image changed: a new copy
    assert preresize.preresize_folder(source, 96, str(tmp_path / "cache")) != copy
    small = preresize.preresize_folder(source, 512, str(tmp_path / "cache"))  # nothing larger: hard links
    assert os.stat(os.path.join(small, names[0])).st_ino == os.stat(os.path.join(source, names[0])).st_ino
