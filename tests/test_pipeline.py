"""The CosPlace pipeline: file names, classes and groups, recalls, checkpoints, train.py and eval.py end to end."""

import json
import os
import shutil
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

from training import checkpoints
import eval as eval_script
from retrieval import faiss_indexes
from conftest import run_folders, run_script, tiny_training_args, train_in_process
from core import files
from datasets import test_dataset
from datasets.dataset_utils import DatasetError, find_queries_folder, format_image_name, parse_image_name
from datasets.image_loading import batches_by_size
from datasets.listing_cache import cache_key, load_groups
from datasets.train_dataset import compute_groups, get_class_id_and_group_id
from retrieval.recalls import compute_recalls
from model import network
from model.backbones import PretrainedWeightsUnavailable

SF_XS_NAME = ("@0543256.96@4178906.70@10@S@037.75180@-122.51044@-3bPAVYkXo4C8Oc3u2iyTQ@@90@@@@201311@@.jpg")


def test_parse_image_name_reads_utm_and_heading():
    metadata = parse_image_name("/data/sf_xs/train/" + SF_XS_NAME)
    assert (metadata.utm_east, metadata.utm_north, metadata.heading) == (543256.96, 4178906.70, 90.0)
    assert (metadata.zone, metadata.letter, metadata.date) == ("10", "S", "201311")


def test_format_image_name_round_trips():
    name = format_image_name(551234.5, 4181234.25, 10, "S", 37.1, -122.2, "pano", heading=275, date="201901")
    metadata = parse_image_name(name)
    assert (metadata.utm_east, metadata.utm_north, metadata.heading, metadata.date) == (551234.5, 4181234.25, 275, "201901")


@pytest.mark.parametrize("name", ["photo.jpg", "@abc@4178906.70@10@S@.jpg", "@1@2@3@4@5@6@7@8@north@.jpg"])
def test_bad_image_names_are_reported_with_the_file_and_format(name):
    with pytest.raises(DatasetError, match=r"photo\.jpg|abc|north") as error:
        parse_image_name(name)
    assert "@utm_east@utm_north@" in str(error.value)


def test_class_and_group_ids_hand_computed():
    # east 549123.7 -> cell 549120, 549120 mod 50 = 20 -> 2; north 4180456.2 -> 4180450, mod 50 = 0 -> 0;
    # heading 95 -> bin 90, 90 mod 60 = 30 -> 1
    class_id, group_id = get_class_id_and_group_id(549123.7, 4180456.2, 95, M=10, alpha=30, N=5, L=2)
    assert class_id == (549120, 4180450, 90)
    assert group_id == (2, 0, 1)
    # Cells 10 m apart are in different groups; cells 50 m apart (N=5) share a group
    assert get_class_id_and_group_id(549133.0, 4180456.2, 95, 10, 30, 5, 2)[1] == (3, 0, 1)
    assert get_class_id_and_group_id(549173.0, 4180456.2, 95, 10, 30, 5, 2)[1] == (2, 0, 1)
    # Heading 359 -> bin 330, 330 mod 60 = 30 -> 1; M=25, alpha=45: east 100.0 -> 100, 100 mod 125 = 100 -> 4
    assert get_class_id_and_group_id(100.0, 0.0, 359, 10, 30, 5, 2) == ((100, 0, 330), (0, 0, 1))
    assert get_class_id_and_group_id(100.0, 0.0, 100, 25, 45, 5, 2) == ((100, 0, 90), (4, 0, 0))


def test_compute_groups_filters_small_classes_and_sorts_groups_by_size():
    # Group (0,0,0): two classes of 3 images; group (1,0,0): one class of 3 and one of 1 (dropped)
    positions = [(0, 0)] * 3 + [(50, 0)] * 3 + [(10, 0)] * 3 + [(60, 0)] * 1
    paths = [f"img{i}" for i in range(len(positions))]
    groups = compute_groups(paths, np.array(positions, float), np.zeros(len(paths)), 10, 30, 5, 2,
                            min_images_per_class=2)
    assert [len(g) for g in groups] == [2, 1]
    assert groups[0] == [["img0", "img1", "img2"], ["img3", "img4", "img5"]]
    assert groups[1] == [["img6", "img7", "img8"]]


def test_class_cache_is_keyed_by_absolute_path_and_file_list(synthetic_dataset, tmp_path):
    train = os.path.join(synthetic_dataset, "train")
    copy = tmp_path / "elsewhere" / "train"
    shutil.copytree(train, copy)
    paths = sorted(os.listdir(train))
    key = cache_key(train, paths, 10, 30, 5, 2, 10)
    assert key != cache_key(str(copy), paths, 10, 30, 5, 2, 10)  # same folder name, other dataset
    assert key != cache_key(train, paths[:-1], 10, 30, 5, 2, 10)  # one file less
    assert key != cache_key(train, paths, 10, 30, 5, 2, 5)  # other parameters
    cache = str(tmp_path / "cache")
    fresh = load_groups(str(copy), 10, 30, 5, 2, 10, cache)
    os.remove(next(copy.iterdir()))  # the cache must not serve a stale class list
    after_removal = load_groups(str(copy), 10, 30, 5, 2, 10, cache)
    assert len(after_removal[0]) == len(fresh[0]) - 1
    assert load_groups(str(copy), 10, 30, 5, 2, 10, cache) == after_removal  # served from the cache
    assert len(os.listdir(cache)) == 2


def brute_force_recalls(database_descriptors, queries_descriptors, database_utms, queries_utms, recall_values,
                        threshold=25):
    """Recall@N from scratch: full distance matrix, argsort, positives by direct UTM distance."""
    distances = ((queries_descriptors[:, None, :] - database_descriptors[None, :, :]) ** 2).sum(-1)
    ranking = np.argsort(distances, axis=1, kind="stable")
    geographic = np.linalg.norm(queries_utms[:, None, :] - database_utms[None, :, :], axis=2)
    found = np.array([[bool((geographic[q, ranking[q, :n]] <= threshold).any()) for n in recall_values]
                      for q in range(len(queries_descriptors))])
    return found.mean(0) * 100


def test_recalls_against_brute_force():
    rng = np.random.default_rng(0)
    database = F.normalize(torch.randn(300, 16), dim=1).numpy()
    queries = F.normalize(torch.randn(80, 16), dim=1).numpy()
    database_utms = rng.uniform(0, 400, (300, 2))
    queries_utms = rng.uniform(0, 400, (80, 2))
    predictions = faiss_indexes.knn_search(database, queries, 20)
    from sklearn.neighbors import NearestNeighbors
    positives = NearestNeighbors().fit(database_utms).radius_neighbors(queries_utms, 25, return_distance=False)
    assert (sum(len(p) == 0 for p in positives)) > 0  # queries without positives count as misses
    recalls = compute_recalls(predictions, positives, [1, 5, 10, 20])
    expected = brute_force_recalls(database, queries, database_utms, queries_utms, [1, 5, 10, 20])
    np.testing.assert_allclose(recalls, expected)


def test_queries_folder_is_found_by_itself(tmp_path):
    (tmp_path / "database").mkdir()
    (tmp_path / "queries_v1").mkdir()
    assert find_queries_folder(str(tmp_path)) == str(tmp_path / "queries_v1")
    (tmp_path / "queries").mkdir()
    assert find_queries_folder(str(tmp_path)) == str(tmp_path / "queries")


def test_images_of_different_sizes_are_batched_by_size(tmp_path):
    for split, sizes in (("database", [(64, 64)] * 3), ("queries", [(80, 60), (64, 64), (80, 60), (60, 80)])):
        os.makedirs(tmp_path / split)
        for i, size in enumerate(sizes):
            Image.new("L" if i % 2 else "RGB", size, 128).save(tmp_path / split / format_image_name(100 + i * 5.0, 0.0))
    dataset = test_dataset.TestDataset(str(tmp_path))
    batches = batches_by_size(dataset, range(len(dataset)), batch_size=16)
    assert sorted(map(sorted, batches)) == [[0, 1, 2, 4], [3, 5], [6]]
    image, _ = dataset[4]  # a grayscale file comes out as 3-channel RGB
    assert image.shape == (3, 64, 64) and image.dtype == torch.uint8


def cosplace_state_dict(fc_output_dim=64):
    """A checkpoint in the layout of the released CosPlace ResNet-18 weights, built independently of our model."""
    torch.manual_seed(1)
    resnet = torchvision.models.resnet18(weights=None)
    backbone = torch.nn.Sequential(*list(resnet.children())[:-2])
    state_dict = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    state_dict["aggregation.1.p"] = torch.tensor([2.5])
    state_dict["aggregation.3.weight"] = torch.randn(fc_output_dim, 512) * 0.05
    state_dict["aggregation.3.bias"] = torch.randn(fc_output_dim) * 0.05
    return backbone, state_dict


def test_released_cosplace_checkpoint_layout_loads_and_computes_the_cosplace_descriptor(tmp_path):
    backbone, state_dict = cosplace_state_dict()
    path = str(tmp_path / "resnet18_64.pth")
    torch.save(state_dict, path)
    model = network.GeoLocalizationNet("resnet18", 64, pretrained="none").eval()
    checkpoints.load_model_weights(model, path)
    images = torch.randn(2, 3, 96, 96)
    with torch.no_grad():  # CosPlace's head written out: L2 -> GeM(p) -> flatten -> linear -> L2
        features = F.normalize(backbone.eval()(images), dim=1)
        pooled = features.clamp(min=1e-6).pow(2.5).mean((-2, -1)).pow(1 / 2.5)
        expected = F.normalize(pooled @ state_dict["aggregation.3.weight"].T + state_dict["aggregation.3.bias"], dim=1)
        np.testing.assert_allclose(model(images).numpy(), expected.numpy(), atol=1e-5)


def test_checkpoint_for_another_model_names_the_mismatch(tmp_path):
    _, state_dict = cosplace_state_dict(fc_output_dim=64)
    path = str(tmp_path / "other.pth")
    torch.save(state_dict, path)
    model = network.GeoLocalizationNet("resnet18", 128, pretrained="none")
    with pytest.raises(checkpoints.CheckpointError, match=r"aggregation\.3\.weight.*\(64, 512\).*\(128, 512\)"):
        checkpoints.load_model_weights(model, path)


def test_missing_imagenet_weights_give_an_actionable_message(monkeypatch, tmp_path):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    with pytest.raises(PretrainedWeightsUnavailable) as error:
        network.GeoLocalizationNet("resnet18", 64, pretrained="imagenet")
    assert "--pretrained none" in str(error.value) and "--pretrained /path/to/weights.pth" in str(error.value)


def test_train_then_eval_on_synthetic_data(synthetic_dataset, tmp_path):
    run_script("train.py", *tiny_training_args(synthetic_dataset, tmp_path, "--epochs_num", "2",
                                               "--num_preds_to_save", "2"))
    [run] = run_folders(tmp_path)
    for name in ("info.log", "debug.log", "args.json", "metrics.jsonl", "last_checkpoint.pth", "best_model.pth",
                 "test_results.json"):
        assert os.path.isfile(os.path.join(run, name)), name
    with open(os.path.join(run, "metrics.jsonl")) as file:
        epochs = [json.loads(line) for line in file]
    assert [e["epoch"] for e in epochs] == [0, 1]
    for e in epochs:  # a recall is a share of the 12 queries, and R@5 finds all that R@1 finds
        assert np.isfinite(e["loss"]) and e["val_R@1"] <= e["val_R@5"]
        assert [e["val_R@1"] * 12 / 100, e["val_R@5"] * 12 / 100] == pytest.approx(
            [round(e["val_R@1"] * 12 / 100), round(e["val_R@5"] * 12 / 100)])
    info_log = open(os.path.join(run, "info.log")).read()
    assert "each class is seen" in info_log and "40 classes" in info_log
    assert len(os.listdir(os.path.join(run, "preds"))) > 0

    # eval.py on the test set with the best model gives the recalls train.py reported for it
    run_script("eval.py", "--resume_model", os.path.join(run, "best_model.pth"), "--test_set_folder",
               os.path.join(synthetic_dataset, "test"), "--pretrained", "none", "--device", "cpu",
               "--num_workers", "0", "--logs_root", tmp_path / "logs", "--save_dir", "eval")
    [eval_run] = run_folders(tmp_path, save_dir="eval")
    results = json.load(open(os.path.join(eval_run, "results.json")))["test_sets"]
    train_results = json.load(open(os.path.join(run, "test_results.json")))
    assert results[os.path.join(synthetic_dataset, "test")]["R@1"] == pytest.approx(train_results["R@1"])
    assert results[os.path.join(synthetic_dataset, "test")]["R@5"] == pytest.approx(train_results["R@5"])


def test_too_many_groups_is_an_actionable_error(synthetic_dataset, tmp_path):
    result = run_script("train.py", *tiny_training_args(synthetic_dataset, tmp_path), "--groups_num", "8",
                        check=False)
    assert result.returncode != 0
    assert "use --groups_num 1" in result.stdout + result.stderr


def test_real_images_train_and_eval_end_to_end(sf_xs_night_mini, tmp_path):
    """A short training on real Street View images, then eval.py; its recalls equal a brute-force computation
    from the descriptors it saved. (Training gains from a random init are small here: not asserted.)"""
    run = train_in_process("--dataset_folder", sf_xs_night_mini, "--groups_num", "1", "--epochs_num", "1",
                           "--iterations_per_epoch", "4", "--batch_size", "16", "--image_size", "64",
                           "--test_image_size", "64", "--pretrained", "none", "--num_workers", "2", "--device", "cpu",
                           "--logs_root", tmp_path / "logs", "--cache_folder", tmp_path / "cache")
    assert "237 classes" in open(os.path.join(run, "info.log")).read()
    eval_script.main(["--resume_model", os.path.join(run, "best_model.pth"), "--dataset_folder", sf_xs_night_mini,
                      "--test_set_folder", os.path.join(sf_xs_night_mini, "val"), os.path.join(sf_xs_night_mini, "test"),
                      "--test_image_size", "64", "--pretrained", "none", "--device", "cpu", "--num_workers", "2",
                      "--save_descriptors", "--logs_root", str(tmp_path / "logs"), "--save_dir", "eval"])
    [eval_run] = run_folders(tmp_path, save_dir="eval")
    results = json.load(open(os.path.join(eval_run, "results.json")))["test_sets"]
    for split in ("val", "test"):
        label = files.test_set_label(os.path.join(sf_xs_night_mini, split)).replace("/", "_")
        saved = np.load(os.path.join(eval_run, label, "descriptors.npz"))
        assert len(saved["queries_paths"]) == {"val": 84, "test": 57}[split]
        expected = brute_force_recalls(saved["database_descriptors"], saved["queries_descriptors"],
                                       saved["database_utms"], saved["queries_utms"], [1, 5, 10, 20])
        got = results[os.path.join(sf_xs_night_mini, split)]
        np.testing.assert_allclose([got["R@1"], got["R@5"], got["R@10"], got["R@20"]], expected, atol=1e-9)


def test_every_flag_is_documented_in_docs_flags():
    import parser
    flags_page = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                                   "flags.md")).read()
    flags = {option for script in parser.SCRIPTS for action in parser.build_parser(script)._actions
             for option in action.option_strings if option.startswith("--") and option != "--help"}
    undocumented = sorted(flag for flag in flags if f"`{flag}`" not in flags_page and f"`{flag}," not in flags_page)
    assert not undocumented, f"flags missing from the flag tables of docs/flags.md: {undocumented}"
    assert parser.flag_tables_markdown() in flags_page, \
        "docs/flags.md's flag tables are not those of the parser: regenerate them with parser.flag_tables_markdown()"
