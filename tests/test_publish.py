"""publish_model.py: a run published as model.safetensors (exactly its weights), args.json, its result files and a
model card with its recalls; hubconf.get_trained_model loading it from the folder or from the Hub; offline or without
a token, one line and the folder kept. No test reaches the network: the Hub is an unreachable address."""

import json
import os

import pytest
import safetensors.torch
import torch

from conftest import REPO_ROOT, run_script, tiny_training_args, train_in_process
from core import files

UNREACHABLE_HUB = "http://127.0.0.1:9"  # the discard port: refused at once


@pytest.fixture(scope="module")
def tiny_run(synthetic_dataset, tmp_path_factory):
    """A 3-iteration run with a non-default descriptor dimension, which only its args.json gives."""
    tmp_path = tmp_path_factory.mktemp("publish")
    return train_in_process(*tiny_training_args(synthetic_dataset, tmp_path, "--fc_output_dim", "32"))


@pytest.fixture(scope="module")
def published(tiny_run, tmp_path_factory):
    import publish_model
    return publish_model.publish(tiny_run, str(tmp_path_factory.mktemp("published") / "model"))


@pytest.fixture
def unreachable_hub(monkeypatch, tmp_path):
    """huggingface_hub pointed at an address that refuses connections, with an empty cache."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "ENDPOINT", UNREACHABLE_HUB)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub_cache"))


def test_the_folder_holds_exactly_the_runs_weights_flags_and_results(tiny_run, published):
    assert sorted(os.listdir(published)) == ["README.md", "args.json", "metrics.jsonl", "model.safetensors",
                                             "test_results.json"]
    saved = torch.load(os.path.join(tiny_run, "best_model.pth"), map_location="cpu")
    weights = safetensors.torch.load_file(os.path.join(published, "model.safetensors"))
    assert weights.keys() == saved.keys()
    assert all(torch.equal(weights[key], saved[key]) for key in saved)
    for name in ("args.json", "test_results.json", "metrics.jsonl"):
        assert files.sha256_of(os.path.join(published, name)) == files.sha256_of(os.path.join(tiny_run, name))


def test_the_model_card_gives_the_architecture_the_recalls_and_how_to_load_it(tiny_run, published):
    with open(os.path.join(published, "README.md")) as file:
        card = file.read()
    with open(os.path.join(tiny_run, "test_results.json")) as file:
        results = json.load(file)
    recalls = {key: value for key, value in results.items() if key.startswith("R@")}
    assert card.startswith("---\nlibrary_name: pytorch\nlicense: mit\n")
    assert "# CosPlace: resnet18 + gem, 32-D descriptors" in card and "- Descriptor: 32 dimensions" in card
    assert "| Test set | " + " | ".join(recalls) + " |" in card
    assert f"| {files.test_set_label(results['dataset'])} | " + " | ".join(f"{value:.1f}" for value in
                                                                           recalls.values()) + " |" in card
    assert "Recalls (%) of best_model.pth, from test_results.json:" in card
    assert 'get_trained_model", source="local", checkpoint="path/to/this/folder")' in card
    assert "--iterations_per_epoch 3" in card and "@inproceedings{Berton_CVPR_2022_CosPlace" in card


def test_torch_hub_loads_the_folder_with_the_runs_descriptors(tiny_run, published):
    import hubconf
    model = torch.hub.load(REPO_ROOT, "get_trained_model", source="local", checkpoint=published)
    run_model = hubconf.get_trained_model(checkpoint=os.path.join(tiny_run, "best_model.pth"))
    images = torch.rand(3, 3, 64, 80)
    with torch.inference_mode():
        assert torch.equal(model(images), run_model(images))
    assert not model.training


def test_repo_id_loads_the_folder_downloaded_from_the_hub(published, unreachable_hub, monkeypatch):
    import hubconf
    downloads = []
    monkeypatch.setattr(hubconf, "snapshot_download",
                        lambda repo_id, **kwargs: downloads.append((repo_id, kwargs)) or published)
    model = hubconf.get_trained_model(repo_id="user/cosplace")
    assert downloads == [("user/cosplace", {"allow_patterns": ["args.json", "model.safetensors"]})]
    weights = safetensors.torch.load_file(os.path.join(published, "model.safetensors"))
    assert all(torch.equal(model.state_dict()[key], value) for key, value in weights.items())


def test_repo_id_offline_is_one_hub_error_line(unreachable_hub):
    import hubconf
    with pytest.raises(hubconf.HubError) as error:
        hubconf.get_trained_model(repo_id="user/cosplace")
    message = str(error.value)
    assert message.startswith("cannot download repo_id='user/cosplace' from the Hugging Face Hub")
    assert "connect this machine to the internet" in message and "\n" not in message


@pytest.mark.parametrize("token, message", [
    ("", "no Hugging Face token; log in with `hf auth login`"),
    ("hf_not_a_real_token", "on the Hugging Face Hub (ConnectError"),
])
def test_an_upload_without_hub_or_token_is_one_line_and_keeps_the_folder(tiny_run, tmp_path, token, message):
    out = tmp_path / "published"
    result = run_script("publish_model.py", tiny_run, "--out", out, "--repo_id", "user/cosplace", check=False,
                        env={"HF_ENDPOINT": UNREACHABLE_HUB, "HF_HUB_DISABLE_TELEMETRY": "1",
                             "HF_HOME": str(tmp_path / "hf_home"), "HF_TOKEN": token})
    [line] = result.stderr.splitlines()
    assert result.returncode == 1 and line.startswith("ERROR: cannot upload") and message in line, result.stderr
    assert line.endswith(f"then run `hf upload user/cosplace {out}` (the folder is written)")
    assert {"model.safetensors", "args.json", "README.md"} <= set(os.listdir(out))


def test_bad_inputs_name_the_file_and_nothing_is_overwritten(tiny_run, tmp_path):
    import publish_model
    no_args = tmp_path / "no_args"
    no_args.mkdir()
    with pytest.raises(publish_model.PublishError, match=f"^{no_args} has no args.json, which gives the architecture"):
        publish_model.publish(str(no_args), str(tmp_path / "out"))
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "args.json").write_text("{}")
    with pytest.raises(publish_model.PublishError) as error:
        publish_model.publish(str(no_weights), str(tmp_path / "out"))
    assert str(error.value).startswith(f"{no_weights / 'best_model.pth'}: no such file (--checkpoint best)")
    assert str(error.value).endswith("publish --checkpoint last")
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    with pytest.raises(publish_model.PublishError, match="is not empty: give a new folder"):
        publish_model.publish(tiny_run, str(kept))
    assert os.listdir(kept) == ["notes.txt"] and (kept / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "out").exists()


def test_checkpoint_last_publishes_the_last_model_and_says_it_was_not_tested(tiny_run, tmp_path):
    import publish_model
    out = publish_model.publish(tiny_run, str(tmp_path / "last"), checkpoint="last")
    saved = torch.load(os.path.join(tiny_run, "last_checkpoint.pth"), map_location="cpu",
                       weights_only=False)["model_state_dict"]  # a training checkpoint: RNG states, numpy scalars
    weights = safetensors.torch.load_file(os.path.join(out, "model.safetensors"))
    assert weights.keys() == saved.keys() and all(torch.equal(weights[key], saved[key]) for key in saved)
    with open(os.path.join(out, "README.md")) as file:
        assert "these weights, last_checkpoint.pth, were not tested" in file.read()


def test_a_truncated_safetensors_file_is_one_checkpoint_error_line(published, tmp_path):
    from training import checkpoints
    truncated = tmp_path / "model.safetensors"
    with open(os.path.join(published, "model.safetensors"), "rb") as file:
        truncated.write_bytes(file.read(1000))
    with pytest.raises(checkpoints.CheckpointError) as error:
        checkpoints.read_model_weights(str(truncated))
    assert str(error.value).startswith(f"{truncated} cannot be read as a safetensors file") and \
        "\n" not in str(error.value)
