"""One evaluation, one model: the flags that only add outputs, caches, speed or a re-ranking stage change neither
the model (its initialisation draws from the same random stream) nor its descriptors and retrieval; damaged or
unwritable caches are reported, recomputed and rewritten, never used silently or fatal."""

import json
import os
import stat

import numpy as np
import pytest
import torch

import eval as eval_script
import parser
from conftest import run_folders, tiny_training_args, train_in_process
from datasets.dataset_utils import DatasetError
from evaluation import descriptors as extraction
from evaluation.settings import InferenceSettings, RerankSettings
from model import network
from reranking import matchers

FLAGS_THAT_CHANGE_NOTHING = [["--rerank", "sift", "--rerank_k", "5", "--rerank_image_size", "64"],
                             ["--num_preds_to_save", "2"], ["--num_preds_to_save", "1", "--save_only_wrong_preds"],
                             ["--descriptors_cache", "{tmp}/cache"], ["--infer_batch_size", "5"],
                             ["--num_workers", "1"]]


def evaluate(dataset, tmp_path, *extra):
    """eval.py of the untrained network on the synthetic test set: (results.json, descriptors.npz)."""
    save_dir = f"run{len(os.listdir(tmp_path / 'logs')) if (tmp_path / 'logs').exists() else 0}"
    results = eval_script.main(["--test_set_folder", os.path.join(dataset, "test"), "--pretrained", "none",
                                "--fc_output_dim", "32", "--device", "cpu", "--num_workers", "0",
                                "--save_descriptors", "--logs_root", str(tmp_path / "logs"), "--save_dir", save_dir,
                                *[flag.format(tmp=tmp_path) for flag in extra]])
    [folder] = run_folders(tmp_path, save_dir)
    saved = dict(np.load(os.path.join(folder, "synthetic0_test", "descriptors.npz")))
    return results, saved


@pytest.fixture(scope="module")
def plain_evaluation(synthetic_dataset, tmp_path_factory):
    return evaluate(synthetic_dataset, tmp_path_factory.mktemp("plain"))


@pytest.mark.parametrize("flags", FLAGS_THAT_CHANGE_NOTHING, ids=lambda flags: flags[0])
def test_eval_flags_change_neither_the_model_nor_its_descriptors(flags, synthetic_dataset, plain_evaluation, tmp_path):
    matchers.build_matcher.cache_clear()  # built in this run, as in a new process
    (plain, plain_saved), (results, saved) = plain_evaluation, evaluate(synthetic_dataset, tmp_path, *flags)
    for name in ("database_descriptors", "queries_descriptors"):
        if flags[0] == "--infer_batch_size":  # other batches: other summation orders in the convolutions
            np.testing.assert_allclose(saved[name], plain_saved[name], rtol=0, atol=1e-5)
        else:
            assert np.array_equal(saved[name], plain_saved[name]), name
    assert np.array_equal(saved["predictions"], plain_saved["predictions"])
    [(key, plain_recalls)] = plain["test_sets"].items()
    recalls = results["test_sets"][key]
    if flags[0] == "--rerank":  # the retrieval order is the plain run's, re-ranked after it
        assert {k[len("retrieval_"):]: v for k, v in recalls.items() if k.startswith("retrieval_")} == plain_recalls
    else:
        assert recalls == plain_recalls


def test_building_a_matcher_draws_nothing_from_the_models_random_stream():
    matchers.build_matcher.cache_clear()
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    matchers.build_matcher("sift", 256)
    assert torch.equal(torch.rand(3), expected)


def final_state(run):
    checkpoint = torch.load(os.path.join(run, "last_checkpoint.pth"), weights_only=False)
    with open(os.path.join(run, "test_results.json")) as file:
        return checkpoint["model_state_dict"], checkpoint["classifiers_state_dict"], json.load(file)


@pytest.mark.parametrize("flags", [["--rerank", "sift", "--rerank_k", "5", "--rerank_image_size", "64"],
                                   ["--num_preds_to_save", "2"], ["--descriptors_cache", "{tmp}/cache"]],
                         ids=lambda flags: flags[0])
def test_train_flags_change_no_trained_weight(flags, synthetic_dataset, tmp_path):
    matchers.build_matcher.cache_clear()
    plain = final_state(train_in_process(*tiny_training_args(synthetic_dataset, tmp_path / "plain")))
    other = final_state(train_in_process(*tiny_training_args(synthetic_dataset, tmp_path / "other",
                                                             *[flag.format(tmp=tmp_path) for flag in flags])))
    for plain_weights, weights in ((plain[0], other[0]), *zip(plain[1], other[1])):
        assert plain_weights.keys() == weights.keys()
        assert all(torch.equal(plain_weights[name], weights[name]) for name in weights)
    recalls = {key: value for key, value in other[2].items() if key.startswith(("R@", "retrieval_R@"))}
    plain_recalls = {key: value for key, value in plain[2].items() if key.startswith("R@")}
    if flags[0] == "--rerank":
        assert {key[len("retrieval_"):]: value for key, value in recalls.items() if "retrieval" in key} \
            == plain_recalls
    else:
        assert recalls == plain_recalls


#### Damaged and unwritable caches

def model_and_dataset(synthetic_dataset):
    from datasets.test_dataset import TestDataset
    torch.manual_seed(0)
    args = parser.parse_arguments("eval", ["--dataset_folder", synthetic_dataset, "--pretrained", "none",
                                           "--fc_output_dim", "32", "--device", "cpu", "--num_workers", "0"])
    return network.GeoLocalizationNet(**parser.model_options(args)).eval(), TestDataset(
        os.path.join(synthetic_dataset, "val"), image_size=48)


def test_a_damaged_descriptors_cache_is_recomputed_and_rewritten(synthetic_dataset, tmp_path, caplog):
    model, dataset = model_and_dataset(synthetic_dataset)
    inference = InferenceSettings(cache_folder=str(tmp_path))
    computed = extraction.dataset_descriptors(dataset, model, inference)
    [cache] = [tmp_path / name for name in os.listdir(tmp_path)]
    with np.load(cache) as stored:
        zeroed = {"array": np.zeros_like(stored["array"]), "sha256": stored["sha256"]}
    np.savez(cache, **zeroed)  # the right size and shape, other numbers (a damaged disk, a foreign write)
    with caplog.at_level("WARNING"):
        again = extraction.dataset_descriptors(dataset, model, inference)
    assert np.array_equal(again, computed)
    assert f"The descriptors cache {cache} holds other descriptors than were written" in caplog.text
    assert np.array_equal(extraction.read_cached_descriptors(str(cache), computed.shape), computed)  # rewritten


def test_an_unwritable_descriptors_cache_keeps_the_evaluation(synthetic_dataset, tmp_path, caplog):
    model, dataset = model_and_dataset(synthetic_dataset)
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    if os.access(folder, os.W_OK):  # root writes anywhere: make the write itself fail
        folder.chmod(0o755)
        (folder / "blocker").write_text("")
        folder = folder / "blocker"  # a file where the cache folder should be
    with caplog.at_level("WARNING"):
        descriptors = extraction.dataset_descriptors(dataset, model, InferenceSettings(cache_folder=str(folder)))
    assert descriptors.shape == (len(dataset), 32)
    assert "The descriptors cache is not written" in caplog.text


def test_a_truncated_local_features_cache_is_recomputed_and_rewritten(synthetic_dataset, tmp_path, caplog):
    from datasets.test_dataset import TestDataset
    from reranking.features import FeatureStore
    dataset = TestDataset(os.path.join(synthetic_dataset, "test"))
    settings, matcher = RerankSettings("sift", 5, 64, 128), matchers.build_matcher("sift", 128)
    first = FeatureStore(matcher, settings, dataset.images_paths, "test", str(tmp_path)).get([0, 1])
    [cache] = [tmp_path / name for name in os.listdir(tmp_path)]
    with open(cache, "r+b") as file:
        file.truncate(os.path.getsize(cache) // 2)
    with caplog.at_level("WARNING"):
        store = FeatureStore(matcher, settings, dataset.images_paths, "test", str(tmp_path))
        again = store.get([0, 1])
    assert "cannot be read (BadZipFile" in caplog.text and store.computed == 2
    assert all(np.array_equal(a["keypoints"], b["keypoints"]) for a, b in zip(first, again))
    assert FeatureStore(matcher, settings, dataset.images_paths, "test", str(tmp_path)).get([0, 1]) and \
        os.path.getsize(cache) > 0  # rewritten: read back whole


def test_an_empty_queries_folder_is_an_error(synthetic_dataset, tmp_path):
    import shutil
    test_set = tmp_path / "test"
    shutil.copytree(os.path.join(synthetic_dataset, "test", "database"), test_set / "database")
    (test_set / "queries").mkdir()
    with pytest.raises(DatasetError, match=r"queries has no images \(.jpg"):
        evaluate(str(tmp_path), tmp_path)


def test_geolocalize_reranks_the_plain_retrieval(synthetic_dataset, tmp_path):
    """geolocalize.py with --rerank re-orders the top-k of the same retrieval: the same k images per photo."""
    import geolocalize
    run = train_in_process(*tiny_training_args(synthetic_dataset, tmp_path))
    database = os.path.join(synthetic_dataset, "test", "database")
    photos = sorted(os.path.join(synthetic_dataset, "test", "queries", name)
                    for name in os.listdir(os.path.join(synthetic_dataset, "test", "queries")))[:3]
    common = ["--resume_model", os.path.join(run, "last_checkpoint.pth"), "--database_folder", database, *photos,
              "--top_k", "4", "--device", "cpu", "--num_workers", "0"]
    matchers.build_matcher.cache_clear()
    plain = geolocalize.main([*common, "--out", str(tmp_path / "plain")])
    reranked = geolocalize.main([*common, "--out", str(tmp_path / "reranked"), "--rerank", "sift", "--rerank_k", "4",
                                 "--rerank_image_size", "64"])
    for plain_photo, reranked_photo in zip(plain, reranked):
        assert sorted(item["path"] for item in plain_photo["top_k"]) == \
            sorted(item["path"] for item in reranked_photo["top_k"])
        assert all(item["verified_matches"] is not None for item in reranked_photo["top_k"])


def test_pictures_that_cannot_be_written_keep_the_evaluation(synthetic_dataset, tmp_path, monkeypatch):
    import visualizations

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(visualizations, "save_summary_page", disk_full)
    results, _ = evaluate(synthetic_dataset, tmp_path, "--num_preds_to_save", "2")
    [folder] = run_folders(tmp_path, "run0")
    with open(os.path.join(folder, "info.log")) as file:
        assert "The prediction pictures of synthetic0/test are not all written" in file.read()
    assert os.path.isfile(os.path.join(folder, "results.json")) and list(results["test_sets"].values())[0]["R@1"] >= 0


def test_an_unwritable_class_cache_keeps_the_classes(synthetic_dataset, tmp_path, caplog):
    from datasets.listing_cache import load_groups
    blocker = tmp_path / "blocker"
    blocker.write_text("")  # a file where the cache folder should be: unwritable even for root
    train = os.path.join(synthetic_dataset, "train")
    with caplog.at_level("WARNING"):
        groups = load_groups(train, 10, 30, 5, 2, 10, str(blocker / "cache"))
    assert "The class cache is not written" in caplog.text
    assert groups == load_groups(train, 10, 30, 5, 2, 10, str(tmp_path / "cache"))


@pytest.mark.parametrize("flag", ["--test_set_folder", "--adabn_folder"])
def test_a_file_given_as_a_folder_is_named_as_such(flag, synthetic_dataset, tmp_path):
    image = os.path.join(synthetic_dataset, "test", "queries", sorted(os.listdir(
        os.path.join(synthetic_dataset, "test", "queries")))[0])
    folder = image if flag == "--test_set_folder" else os.path.join(synthetic_dataset, "test")
    extra = ["--adabn_folder", image] if flag == "--adabn_folder" else []
    with pytest.raises(DatasetError, match="is a file, not a folder"):
        eval_script.main(["--test_set_folder", folder, "--pretrained", "none", "--device", "cpu", "--num_workers", "0",
                          "--logs_root", str(tmp_path / "logs"), *extra])


def test_save_descriptors_changes_no_recall(synthetic_dataset, plain_evaluation, tmp_path):
    """The runs above all save their descriptors (to compare them): without --save_descriptors, the same recalls."""
    results = eval_script.main(["--test_set_folder", os.path.join(synthetic_dataset, "test"), "--pretrained", "none",
                                "--fc_output_dim", "32", "--device", "cpu", "--num_workers", "0",
                                "--logs_root", str(tmp_path / "logs")])
    assert results["test_sets"] == plain_evaluation[0]["test_sets"]
    assert not any(name == "descriptors.npz" for _, _, names in os.walk(tmp_path / "logs") for name in names)
