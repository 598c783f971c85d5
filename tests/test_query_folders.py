"""Several query folders per test set (Tokyo-XS: queries/ and night/): one row each from one eval.py call, the
database descriptors computed once, and each row equal to an evaluation of its query folder alone."""

import json
import os
import shutil

import numpy as np
import pytest

import eval as eval_script
import parser
from datasets.dataset_utils import DatasetError
from datasets.test_dataset import query_folders
from evaluation import descriptors
from conftest import run_folders, tiny_training_args, train_in_process


def copy_images(paths, folder):
    os.makedirs(folder)
    for path in paths:
        shutil.copy(path, folder)


@pytest.fixture(scope="module")
def tokyo_like(synthetic_dataset, tmp_path_factory):
    """tokyo_like/test with database/, queries/ (half the synthetic test queries) and night/ (the other half), and
    night_only/test with the same database/ and the night queries as queries/."""
    root = tmp_path_factory.mktemp("query_folders")
    source = os.path.join(synthetic_dataset, "test")
    queries = sorted(os.path.join(source, "queries", name) for name in os.listdir(os.path.join(source, "queries")))
    database = [os.path.join(source, "database", name) for name in os.listdir(os.path.join(source, "database"))]
    tokyo, night_only = str(root / "tokyo_like" / "test"), str(root / "night_only" / "test")
    copy_images(database, os.path.join(tokyo, "database"))
    copy_images(queries[::2], os.path.join(tokyo, "queries"))
    copy_images(queries[1::2], os.path.join(tokyo, "night"))
    os.makedirs(os.path.join(tokyo, "notes"))  # a folder without images is not a query folder
    copy_images(database, os.path.join(night_only, "database"))
    copy_images(queries[1::2], os.path.join(night_only, "queries"))
    return tokyo, night_only


def evaluate(folder, tmp_path, *extra):
    return eval_script.main(["--test_set_folder", folder, "--pretrained", "none", "--fc_output_dim", "64",
                             "--device", "cpu", "--num_workers", "0", "--save_descriptors",
                             "--logs_root", str(tmp_path / "logs"), *extra])


def test_query_folders_rule(tokyo_like, tmp_path):
    tokyo, _ = tokyo_like
    assert [os.path.basename(f) for f in query_folders(tokyo)] == ["queries", "night"]
    os.makedirs(tmp_path / "sf_xl" / "database")
    for name in ("a_extra", "queries_v1"):
        (tmp_path / "sf_xl" / name / "sub").mkdir(parents=True)
        (tmp_path / "sf_xl" / name / "sub" / "x.jpg").write_bytes(b"")
    assert [os.path.basename(f) for f in query_folders(str(tmp_path / "sf_xl"))] == ["queries_v1", "a_extra"]
    assert [os.path.basename(f) for f in query_folders(tokyo, ["night"])] == ["night"]
    with pytest.raises(DatasetError, match="has no folder dusk"):
        query_folders(tokyo, ["dusk"])


def test_night_row_equals_the_night_queries_alone(tokyo_like, tmp_path, monkeypatch):
    tokyo, night_only = tokyo_like
    groups = []  # the index groups of each descriptor computation
    compute = descriptors.compute_descriptors
    monkeypatch.setattr(descriptors, "compute_descriptors",
                        lambda *a, **k: groups.append([len(g) for g in k["index_groups"]]) or compute(*a, **k))
    results = evaluate(tokyo, tmp_path)
    assert groups == [[24, 6], [6]]  # the database once, then each query folder
    night_results = evaluate(night_only, tmp_path)
    night_key = os.path.join(tokyo, "night")
    assert results["labels"] == {tokyo: "tokyo_like/test", night_key: "tokyo_like/test/night"}
    assert results["test_sets"][night_key] == night_results["test_sets"][night_only]
    # the rows' numbers against a brute-force search of the saved descriptors
    eval_folder = run_folders(tmp_path)[0]
    for label, key in (("tokyo_like_test", tokyo), ("tokyo_like_test_night", night_key)):
        saved = np.load(os.path.join(eval_folder, label, "descriptors.npz"))
        distances = ((saved["queries_descriptors"][:, None] - saved["database_descriptors"][None]) ** 2).sum(-1)
        ranked = np.argsort(distances, axis=1, kind="stable")
        metres = np.linalg.norm(saved["queries_utms"][:, None] - saved["database_utms"][None], axis=-1)
        found = [[bool((metres[q, ranked[q, :n]] <= 25).any()) for q in range(len(ranked))] for n in (1, 5)]
        assert [results["test_sets"][key][f"R@{n}"] for n in (1, 5)] == pytest.approx(
            [100 * np.mean(f) for f in found])
    night_saved = np.load(os.path.join(eval_folder, "tokyo_like_test_night", "descriptors.npz"))
    queries_saved = np.load(os.path.join(eval_folder, "tokyo_like_test", "descriptors.npz"))
    assert np.array_equal(night_saved["database_descriptors"], queries_saved["database_descriptors"])
    assert len(os.listdir(os.path.join(eval_folder, "tokyo_like_test_night"))) > 0
    with open(os.path.join(eval_folder, "info.log")) as file:
        log = file.read()
    assert "tokyo_like/test/night: R@1" in log


def test_query_folders_flag_picks_them(tokyo_like, tmp_path):
    tokyo, _ = tokyo_like
    results = evaluate(tokyo, tmp_path, "--query_folders", "night")
    assert list(results["labels"].values()) == ["tokyo_like/test/night"]


def test_eval_takes_the_test_size_of_the_checkpoint_unless_given(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "args.json").write_text(json.dumps({"backbone": "resnet18", "test_image_size": 224,
                                               "test_resize": "square"}))
    model = str(run / "best_model.pth")
    args = parser.parse_arguments("eval", ["--resume_model", model, "--test_set_folder", "x"])
    assert (args.test_image_size, args.test_resize) == (224, "square")
    assert args.flags_from_checkpoint == {"test_image_size": 224, "test_resize": "square"}
    args = parser.parse_arguments("eval", ["--resume_model", model, "--test_set_folder", "x",
                                           "--test_image_size", "none"])
    assert (args.test_image_size, args.test_resize) == (None, "square")
    assert args.flags_from_checkpoint == {"test_resize": "square"}


def test_training_tests_every_query_folder(tokyo_like, synthetic_dataset, tmp_path):
    """train.py's final test gives the night row too, in test_results.json, equal to eval.py's on the same weights."""
    tokyo, _ = tokyo_like
    folder = train_in_process(*tiny_training_args(synthetic_dataset, tmp_path, "--test_set_folder", tokyo,
                                                  "--fc_output_dim", "64"))
    with open(os.path.join(folder, "test_results.json")) as file:
        tested = json.load(file)
    assert tested["queries"] == os.path.join(tokyo, "queries")
    night = tested["other_query_sets"]["tokyo_like/test/night"]
    assert night["queries"] == os.path.join(tokyo, "night")
    results = evaluate(tokyo, tmp_path, "--resume_model", tested["model"])
    for key, record in ((tokyo, tested), (os.path.join(tokyo, "night"), night)):
        assert [results["test_sets"][key][f"R@{n}"] for n in (1, 5)] == [record[f"R@{n}"] for n in (1, 5)]
    assert os.path.isdir(os.path.join(folder, "tokyo_like_test_night"))


def test_make_report_gives_the_night_column_of_a_training_run(tokyo_like, synthetic_dataset, tmp_path):
    from reporting.runs import evaluations_of, load_run
    tokyo, _ = tokyo_like
    folder = train_in_process(*tiny_training_args(synthetic_dataset, tmp_path, "--test_set_folder", tokyo,
                                                  "--fc_output_dim", "64"))
    (evaluation,) = evaluations_of(load_run(folder))
    with open(os.path.join(folder, "test_results.json")) as file:
        tested = json.load(file)
    assert evaluation.cells["tokyo_like/test"][0]["R@1"] == tested["R@1"]
    assert evaluation.cells["tokyo_like/test/night"][0]["R@5"] == tested["other_query_sets"]["tokyo_like/test/night"]["R@5"]
