"""Re-ranking the top-K by local feature matching (reranking/, eval.py --rerank): a constructed
case it must solve, orders and recalls checked against computations of their own, the local features cache, the
results file, and the one-line error of a learned matcher whose weights cannot be had."""

import glob
import json
import os
import shutil
import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import parser
from reranking import matchers
from conftest import REPO_ROOT, run_script, shared_or_skip, tiny_training_args, train_in_process
from datasets.dataset_utils import find_images
from datasets.test_dataset import TestDataset
from evaluation.settings import RerankSettings
from reranking.features import FeatureStore
from reranking.stage import rerank_test

MATCHER_WEIGHTS = os.path.join(REPO_ROOT, "..", "shared", "weights", "matchers")


def texture(seed, size=128):
    """A picture of 40 random coloured ellipses and rectangles: corners and blobs for SIFT, different per seed."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(40):
        x, y = rng.integers(0, size, 2)
        width, height = rng.integers(6, 30, 2)
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([int(x), int(y), int(x + width), int(y + height)], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return image


def rerank_settings(k=5, method="sift"):
    return RerankSettings(method, k, image_size=128, keypoints=256)


@pytest.fixture(scope="module")
def constructed_case(tmp_path_factory):
    """Database images 0-3 (the query's source at index 1) and the query (index 4): the source rotated by 8 degrees,
    cropped and scaled up, darker."""
    folder = tmp_path_factory.mktemp("textures")
    source = texture(1)
    query = source.rotate(8, resample=Image.BICUBIC).crop((8, 8, 120, 120)).resize((128, 128), Image.BICUBIC)
    query = query.point(lambda value: int(value * 0.7))
    paths = []
    for name, image in [("unrelated0", texture(2)), ("source", source), ("unrelated1", texture(3)),
                        ("unrelated2", texture(4)), ("query", query)]:
        paths.append(str(folder / f"{name}.png"))
        image.save(paths[-1])
    return paths


def test_sift_moves_the_true_match_from_rank_2_to_rank_1(constructed_case):
    matcher = matchers.build_matcher("sift", 256)
    store = FeatureStore(matcher, rerank_settings(), constructed_case, "textures")
    retrieval = np.array([[0, 1, 2, 3]])  # the source at rank 2
    result = matchers.rerank(matcher, "sift", retrieval, 4, store, store, query_offset=4)
    assert result.predictions.tolist() == [[1, 0, 2, 3]]  # the source first, the others in their retrieval order
    inliers = result.inliers[0]
    assert inliers[1] >= 10 and max(inliers[[0, 2, 3]]) <= 4, inliers  # verified matches only with the source
    query_points, source_points = result.top1_matches[0]
    assert len(query_points) == len(source_points) == inliers[1]
    # The query is the source rotated and cropped: its matched points map back to the source's by that warp
    size, crop = 128, 8 / 128
    expected = source_points - 0.5  # source fractions, centred; rotate by +8 degrees (PIL: counter-clockwise)
    angle = np.deg2rad(8)
    rotated = np.stack([np.cos(angle) * expected[:, 0] + np.sin(angle) * expected[:, 1],
                        -np.sin(angle) * expected[:, 0] + np.cos(angle) * expected[:, 1]], axis=1) + 0.5
    assert np.median(np.abs((rotated - crop) / (1 - 2 * crop) - query_points)) * size < 2  # pixels


def test_reranked_order_keeps_the_retrieval_order_of_equal_scores_and_sorts_the_rest():
    rng = np.random.default_rng(0)
    predictions = np.stack([rng.permutation(50)[:20] for _ in range(30)])
    predictions[3, 15:] = -1  # fewer found (an approximate index): they stay last
    k = 10
    assert np.array_equal(matchers.reranked_order(predictions, np.zeros((30, k)), k), predictions)
    scores = rng.integers(0, 4, size=(30, k)).astype(float)  # many ties
    new = matchers.reranked_order(predictions, scores, k)
    for row, row_scores, new_row in zip(predictions, scores, new):
        by_hand = [row[i] for i in sorted(range(k), key=lambda i: (-row_scores[i], i))]
        assert new_row[:k].tolist() == by_hand and new_row[k:].tolist() == row[k:].tolist()
    padded = np.array([[7, 8, -1, -1]])
    assert matchers.reranked_order(padded, np.array([[0, 0, 0, 0]]), 4).tolist() == [[7, 8, -1, -1]]


def brute_force_recalls(predictions, positives, recall_values):
    return [100 * np.mean([len(set(row[:n]) & set(p)) > 0 for row, p in zip(predictions, positives)])
            for n in recall_values]


def test_rerank_test_recalls_scores_and_cache(synthetic_dataset, tmp_path):
    dataset = TestDataset(os.path.join(synthetic_dataset, "test"))
    rng = np.random.default_rng(1)  # a retrieval: every database image in a random order
    predictions = np.stack([rng.permutation(dataset.database_num)[:20] for _ in range(dataset.queries_num)])
    recall_values = [1, 5, 10, 20]
    given_recalls = np.array(brute_force_recalls(predictions, dataset.get_positives(), recall_values))
    settings, cache = rerank_settings(k=5), str(tmp_path / "cache")
    recalls, new, result = rerank_test(settings, dataset, predictions, given_recalls, recall_values, cache)
    assert result.features_computed > 0 and result.retrieval_recalls is given_recalls
    assert np.array_equal(new, result.predictions) and np.array_equal(new[:, 5:], predictions[:, 5:])
    assert np.allclose(recalls, brute_force_recalls(new, dataset.get_positives(), recall_values))
    assert np.allclose(recalls[1:], given_recalls[1:])  # within the top-5 the order changes, not the set
    # The order is the inlier counts' (ties: retrieval order), and each count is that of its own pair, recomputed
    for row, counts, new_row in zip(predictions, result.inliers, new):
        assert new_row[:5].tolist() == [row[i] for i in sorted(range(5), key=lambda i: (-counts[i], i))]
    matcher = matchers.build_matcher("sift", 256)
    fresh = FeatureStore(matcher, rerank_settings(), dataset.images_paths, "fresh")  # no cache
    for query_index in (0, 7):
        query_features = fresh[dataset.database_num + query_index]
        by_hand = [matcher.verify(query_features, [fresh[d]])[0][0] for d in predictions[query_index, :5]]
        assert result.inliers[query_index].tolist() == by_hand
    # Second evaluation: every local feature comes from the cache, with the same result
    recalls_again, new_again, result_again = rerank_test(settings, dataset, predictions, given_recalls,
                                                         recall_values, cache)
    assert result_again.features_computed == 0
    assert np.array_equal(new_again, new) and np.array_equal(result_again.inliers, result.inliers)


def test_eval_with_rerank_writes_both_orders_and_the_settings(synthetic_dataset, tmp_path):
    run_script("eval.py", "--dataset_folder", synthetic_dataset, "--pretrained", "none", "--device", "cpu",
               "--num_workers", "0", "--rerank", "sift", "--rerank_k", "5", "--rerank_image_size", "96",
               "--num_preds_to_save", "1", "--logs_root", tmp_path / "logs", "--save_dir", "rerank")
    (folder,) = os.listdir(tmp_path / "logs" / "rerank")
    with open(tmp_path / "logs" / "rerank" / folder / "results.json") as file:
        results = json.load(file)
    assert {key: results["settings"][key] for key in ("rerank", "rerank_k", "rerank_image_size")} == \
        {"rerank": "sift", "rerank_k": 5, "rerank_image_size": 96}
    (key,) = results["test_sets"]
    recalls = results["test_sets"][key]
    assert all(recalls[f"R@{n}"] == recalls[f"retrieval_R@{n}"] for n in (5, 10, 20))  # K=5 changes only R@1
    assert results["rerank_ms_per_query"][key] > 0
    (preds,) = glob.glob(str(tmp_path / "logs" / "rerank" / folder / "*" / "preds"))
    assert len(os.listdir(preds)) == 12  # with the verified matches of each top-1


def test_training_reranks_its_final_test_like_eval(synthetic_dataset, tmp_path):
    """train.py's final test with --rerank records both orders, and equals eval.py's re-ranking of the same weights."""
    rerank = ["--rerank", "sift", "--rerank_k", "5", "--rerank_image_size", "96"]
    run = train_in_process(*tiny_training_args(synthetic_dataset, tmp_path, *rerank))
    with open(os.path.join(run, "test_results.json")) as file:
        tested = json.load(file)
    assert tested["settings"]["rerank"] == "sift" and tested["rerank_ms_per_query"] > 0
    assert all(tested[f"R@{n}"] == tested[f"retrieval_R@{n}"] for n in (5, 10, 20))
    import eval as eval_script
    results = eval_script.main(["--resume_model", tested["model"], "--test_set_folder", tested["dataset"],
                                "--pretrained", "none", "--device", "cpu", "--num_workers", "0", "--logs_root",
                                str(tmp_path / "eval_logs"), *rerank])
    assert results["test_sets"][tested["dataset"]] == {key: value for key, value in tested.items()
                                                       if key.startswith(("R@", "retrieval_R@"))}


def test_geolocalize_reranks_its_predictions(synthetic_dataset, tmp_path):
    import geolocalize
    run = train_in_process(*tiny_training_args(synthetic_dataset, tmp_path))
    database = os.path.join(synthetic_dataset, "test", "database")
    photo = find_images(database)[5]  # a database image: itself, with the most verified matches, comes first
    results = geolocalize.main(["--resume_model", os.path.join(run, "last_checkpoint.pth"), "--database_folder",
                                database, photo, "--top_k", "3", "--rerank", "sift", "--rerank_k", "6",
                                "--rerank_image_size", "96", "--device", "cpu", "--num_workers", "0",
                                "--descriptors_cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out")])
    top_k = results[0]["top_k"]
    assert top_k[0]["path"] == photo and len(top_k) == 3
    counts = [item["verified_matches"] for item in top_k]
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[1]
    with open(tmp_path / "out" / "geolocalize.json") as file:
        assert json.load(file)["rerank"]["rerank_k"] == 6


@pytest.mark.parametrize("name", ["xfeat", "xfeat_lighterglue", "disk_lightglue", "loftr"])
def test_learned_matchers_run_and_cache_images_of_two_sizes(name, constructed_case, tmp_path, monkeypatch):
    """Without their weights (CI): with random ones, their code runs end to end (no verified matches to expect),
    and their cached features (LoFTR's: images) come back for images of two sizes. With the real weights: the
    test that follows."""
    import kornia.feature as KF
    import kornia.feature.lightglue as lightglue_module
    monkeypatch.setattr(lightglue_module, "load_state_dict_from_url", lambda *args, **kwargs: {})  # no weights
    builds = {"DISK": KF.DISK, "LightGlue (DISK)": lambda: KF.LightGlueMatcher("disk"), "XFeat": KF.XFeat,
              "LighterGlue (XFeat)": lambda: KF.LightGlue("xfeat"),
              "LoFTR (outdoor)": lambda: KF.LoFTR(pretrained=None)}
    monkeypatch.setattr(matchers, "pretrained", lambda what, build, rerank_name: builds[what]())
    matchers.build_matcher.cache_clear()
    torch.manual_seed(0)
    matcher = matchers.build_matcher(name, 64)
    matchers.build_matcher.cache_clear()  # not the random one for the other tests
    tall = str(tmp_path / "tall.png")
    Image.open(constructed_case[0]).resize((128, 192)).save(tall)
    paths = [*constructed_case[1:4], tall, constructed_case[4]]
    results = []
    for _ in range(2):  # computed, then read from the cache
        store = FeatureStore(matcher, rerank_settings(method=name), paths, "textures", str(tmp_path / "cache"))
        results.append(matchers.rerank(matcher, name, np.array([[0, 1, 2, 3]]), 4, store, store, query_offset=4))
    assert results[0].features_computed == 5 and results[1].features_computed == 0
    assert np.array_equal(results[0].inliers, results[1].inliers)
    assert sorted(results[0].predictions[0].tolist()) == [0, 1, 2, 3]


@pytest.mark.parametrize("online", [False, True])
def test_unavailable_weights_are_one_line_and_fast(online, tmp_path, monkeypatch):
    import kornia.feature.loftr.loftr as loftr_module

    def download(*args, **kwargs):
        raise RuntimeError("Failed to load weights from all 2 source(s).\nLast error: URLError: <urlopen error "
                           "[Errno -2] Name or service not known>")
    monkeypatch.setattr(loftr_module, "load_state_dict_from_url", download)
    monkeypatch.setattr(matchers, "internet_reachable", lambda host: online)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    matchers.build_matcher.cache_clear()
    start = time.perf_counter()
    with pytest.raises(matchers.WeightsUnavailableError) as error:
        matchers.build_matcher("loftr", 64)
    assert time.perf_counter() - start < 10
    message = str(error.value)
    assert "\n" not in message and message.startswith("--rerank loftr: ") and "--rerank sift" in message
    assert str(tmp_path) in message and ("no connection to huggingface.co" in message) != online
    assert matchers.kornia.core.download._MAX_ATTEMPTS == 3  # kornia's retries restored


def test_rerank_flag_is_checked_against_the_registry():
    with pytest.raises(parser.FlagError, match="--rerank surf is unknown: choose one of none, sift, "):
        parser.parse_arguments("eval", ["--dataset_folder", "d", "--rerank", "surf"])


@pytest.fixture(scope="module")
def matcher_weights_home(tmp_path_factory):
    """A torch hub folder whose checkpoints/ holds copies of the learned matchers' weights of ../shared, as a user
    without internet makes it (skipped when ../shared has no such weights)."""
    shared = shared_or_skip(MATCHER_WEIGHTS, "the learned matchers' weights (XFeat, LighterGlue, DISK, LightGlue)")
    home = tmp_path_factory.mktemp("hub")
    os.makedirs(home / "checkpoints")
    for name in os.listdir(shared):
        if name != "README.txt":
            shutil.copy(os.path.join(shared, name), home / "checkpoints" / name)
    return str(home)


@pytest.mark.parametrize("name", ["xfeat", "xfeat_lighterglue", "disk_lightglue"])
def test_learned_matchers_with_real_weights_offline_find_the_place_among_far_ones(
        name, matcher_weights_home, sf_xs_night_mini, monkeypatch):
    """Offline, with the weights copied into the torch hub cache: a night query of the real mini set and, at rank 2,
    a database image of its place (within 25 m), among three taken over a kilometre away; the matcher verifies
    several times more matches with the place and moves it to rank 1."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: matcher_weights_home)
    monkeypatch.setattr(matchers, "internet_reachable", lambda host: False)
    matchers.build_matcher.cache_clear()
    matcher = matchers.build_matcher(name, 512)
    matchers.build_matcher.cache_clear()
    dataset = TestDataset(os.path.join(sf_xs_night_mini, "val"))
    distances = np.linalg.norm(dataset.database_utms - dataset.queries_utms[0], axis=1)
    place, far = dataset.get_positives()[0][0], np.argsort(-distances)[:3]
    assert distances[place] < 25 and distances[far].min() > 1000
    paths = [dataset.images_paths[i] for i in (far[0], place, far[1], far[2])] + [dataset.images_paths[
        dataset.database_num]]
    store = FeatureStore(matcher, RerankSettings(name, 4, image_size=224, keypoints=512), paths, "real")
    result = matchers.rerank(matcher, name, np.array([[0, 1, 2, 3]]), 4, store, store, query_offset=4)
    inliers = result.inliers[0]
    assert result.predictions[0, 0] == 1 and inliers[1] >= 20 and inliers[1] >= 3 * max(inliers[[0, 2, 3]]), inliers
