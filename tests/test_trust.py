"""No silent wrong number: recalls in any --recall_values order, every evaluation recorded with the settings that
change a recall, a checkpoint evaluated offline with one flag, evaluation in fp32 as upstream, and the loss terms
of training shown and logged apart."""

import json
import os

import numpy as np
import pytest

import eval as eval_script
import parser
from conftest import run_folders, run_script, tiny_training_args
from evaluation import descriptors


@pytest.fixture(scope="module")
def trained_run(synthetic_dataset, tmp_path_factory):
    """A tiny training with a non-default architecture (descriptors of 64), SSL and DANN on, that deletes its
    last_checkpoint.pth once finished."""
    folder = tmp_path_factory.mktemp("trained")
    result = run_script("train.py", *tiny_training_args(
        synthetic_dataset, folder, "--image_size", "32", "--fc_output_dim", "64", "--val_every", "2",
        "--no-keep_last_checkpoint",
        "--log_every", "1", "--ssl_loss", "vicreg", "--da_target_folder",
        os.path.join(synthetic_dataset, "test", "queries")))
    return run_folders(folder)[-1], result


def brute_force_recalls(npz_path, threshold, recall_values):
    """recall@N from saved descriptors: nearest database images by squared L2 distance, positives by UTM distance."""
    data = np.load(npz_path)
    distances = ((data["queries_descriptors"][:, None] - data["database_descriptors"][None]) ** 2).sum(-1)
    ranking = np.argsort(distances, axis=1, kind="stable")
    positives = np.linalg.norm(data["queries_utms"][:, None] - data["database_utms"][None], axis=-1) <= threshold
    return [100 * np.mean([positives[q, ranking[q, :n]].any() for q in range(len(ranking))]) for n in recall_values]


def test_recalls_are_right_in_any_order_of_recall_values(trained_run, synthetic_dataset, tmp_path):
    run, _ = trained_run
    results = eval_script.main(["--resume_model", os.path.join(run, "best_model.pth"), "--test_set_folder",
                                os.path.join(synthetic_dataset, "test"), "--recall_values", "5", "1", "--device",
                                "cpu", "--num_workers", "0", "--logs_root", str(tmp_path / "logs"),
                                "--save_descriptors"])
    [eval_folder] = run_folders(tmp_path)
    recalls = results["test_sets"][os.path.join(synthetic_dataset, "test")]
    expected = brute_force_recalls(os.path.join(eval_folder, "synthetic0_test", "descriptors.npz"), 25, (1, 5))
    assert [recalls["R@1"], recalls["R@5"]] == pytest.approx(expected)
    assert expected[0] < expected[1]  # the two recalls differ here, so a swap would show


def test_eval_needs_only_the_checkpoint_and_records_its_settings(trained_run, synthetic_dataset, tmp_path):
    """Offline, with the default --pretrained imagenet: the architecture comes from args.json, no download."""
    run, _ = trained_run
    model = os.path.join(run, "best_model.pth")
    result = run_script("eval.py", "--resume_model", model, "--test_set_folder", os.path.join(synthetic_dataset,
                        "test"), "--device", "cpu", "--num_workers", "0", "--logs_root", tmp_path / "logs",
                        "--test_image_size", "48", "--faiss_index", "hnsw",
                        env={"HF_HUB_OFFLINE": "1", "TORCH_HOME": str(tmp_path / "no_weights")})
    assert f"--fc_output_dim 64: taken from the args.json beside --resume_model {model}" in result.stdout
    [eval_folder] = run_folders(tmp_path)
    results = json.load(open(os.path.join(eval_folder, "results.json")))
    assert results["model"] == os.path.abspath(model) and len(results["model_sha256"]) == 64
    assert results["settings"] == {"test_image_size": 48, "test_resize": "shorter_side", "faiss_index": "hnsw",
                                   "faiss_options": {"hnsw_m": 32, "ef_search": 128}, "adabn_folder": None,
                                   "amp": "none", "positive_dist_threshold": 25}
    assert json.load(open(os.path.join(eval_folder, "args.json")))["resume_model"] == model
    contradiction = run_script("eval.py", "--resume_model", model, "--fc_output_dim", "128", "--test_set_folder",
                               os.path.join(synthetic_dataset, "test"), check=False)
    assert contradiction.returncode == 2 and "--fc_output_dim 128 contradicts the checkpoint's --fc_output_dim 64" \
        in contradiction.stderr


def test_evaluation_runs_in_fp32_unless_asked(monkeypatch, synthetic_dataset, trained_run):
    """Upstream evaluates in fp32: training's --amp does not reach the descriptors; --eval_amp does."""
    args = parser.parse_arguments("train", ["--dataset_folder", synthetic_dataset, "--amp", "fp16"])
    assert args.amp == "fp16" and args.eval_amp == "none"
    used = []
    monkeypatch.setattr(descriptors, "compute_descriptors", lambda *a, **k: used.append(a[5]) or np.zeros((1, 1)))
    descriptors.dataset_descriptors(type("Dataset", (), {"image_size": None, "test_resize": "shorter_side",
                                                         "dataset_name": "d"})(), None, parser.inference_settings(args))
    assert used == ["none"]


def test_training_shows_and_logs_each_loss_term(trained_run):
    run, result = trained_run
    assert "loss=" in result.stderr  # the progress bar's loss, updated whenever the losses are read
    records = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert [r["step"] for r in records] == [0, 2, 3]
    for record in records[1:]:
        assert record["loss"] > record["ssl_loss"] > 0 and record["dann_loss"] > 0
        assert 0 <= record["dann_domain_accuracy"] <= 1
    assert os.path.exists(os.path.join(run, "best_model.pth")) and not os.path.exists(os.path.join(
        run, "last_checkpoint.pth"))  # --no-keep_last_checkpoint
    info = open(os.path.join(run, "info.log")).read()
    assert "ssl_loss = " in info and "dann_loss = " in info and "dann_domain_accuracy = " in info
