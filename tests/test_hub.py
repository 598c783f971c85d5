"""hubconf.py: torch.hub.load of a run of ours (architecture from its args.json, exactly its weights, eval mode,
L2-normalised descriptors) and of the released CosPlace weights (upstream's URL and keys; offline: one line); eval.py
inheriting the run's test resolution; what building a model logs, and how fast it fails offline."""

import os
import socket
import urllib.error

import pytest
import torch

from conftest import REPO_ROOT, tiny_training_args, train_in_process


@pytest.fixture(scope="module")
def tiny_run(synthetic_dataset, tmp_path_factory):
    """A 3-iteration run with a non-default descriptor dimension and test resolution, so that only its args.json
    can give them."""
    tmp_path = tmp_path_factory.mktemp("hub")
    return train_in_process(*tiny_training_args(synthetic_dataset, tmp_path, "--fc_output_dim", "32",
                                                "--test_image_size", "64", "--test_resize", "square"))


def test_a_run_of_ours_loads_with_exactly_its_weights(tiny_run):
    checkpoint = os.path.join(tiny_run, "best_model.pth")
    model = torch.hub.load(REPO_ROOT, "get_trained_model", source="local", checkpoint=checkpoint)
    saved = torch.load(checkpoint, map_location="cpu")
    loaded = model.state_dict()
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[key], saved[key]) for key in saved)
    assert not model.training and all(not module.training for module in model.modules())
    with torch.inference_mode():
        descriptors = model(torch.rand(3, 3, 64, 80))
    assert descriptors.shape == (3, 32)
    torch.testing.assert_close(descriptors.norm(dim=1), torch.ones(3))


@pytest.mark.parametrize("given, expected", [
    ([], {"test_image_size": 64, "test_resize": "square"}),
    (["--test_image_size", "none"], {"test_image_size": None, "test_resize": "square"}),  # a flag given wins
    (["--test_image_size", "96", "--test_resize", "shorter_side"],
     {"test_image_size": 96, "test_resize": "shorter_side"}),
])
def test_eval_inherits_the_test_resolution_of_the_checkpoints_run(tiny_run, given, expected):
    """parser.INHERITED_FLAGS: eval.py tests at the resolution the run was tested with, unless told otherwise."""
    import parser
    args = parser.parse_arguments("eval", ["--resume_model", os.path.join(tiny_run, "best_model.pth"),
                                           "--test_set_folder", "unused", *given])
    assert {flag: getattr(args, flag) for flag in expected} == expected
    assert args.flags_from_checkpoint == {"fc_output_dim": 32, **{flag: value for flag, value in expected.items()
                                                                  if f"--{flag}" not in given}}


def test_released_weights_come_from_upstreams_url_with_its_keys(monkeypatch):
    import hubconf
    from model.network import GeoLocalizationNet
    released = GeoLocalizationNet("resnet18", 64, pretrained="none").state_dict()  # upstream's keys are ours
    urls = []
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda url, **kwargs: urls.append(url) or released)
    model = hubconf.get_trained_model(backbone="ResNet18", fc_output_dim=64)
    assert urls == ["https://github.com/gmberton/CosPlace/releases/download/v1.0/ResNet18_64_cosplace.pth"]
    assert all(torch.equal(model.state_dict()[key], value) for key, value in released.items())
    assert not model.training


@pytest.mark.parametrize("kwargs, message", [
    ({"backbone": "ResNet34"}, "backbone='ResNet34' has no released weights: choose one of VGG16, ResNet18"),
    ({"backbone": "VGG16", "fc_output_dim": 32}, "fc_output_dim=32 is not released for VGG16"),
])
def test_unreleased_models_are_refused_in_one_line(kwargs, message):
    import hubconf
    with pytest.raises(hubconf.HubError) as error:
        hubconf.get_trained_model(**kwargs)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_offline_is_one_line_naming_the_url_and_the_cache(monkeypatch):
    import hubconf

    def offline(url, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(hubconf.HubError) as error:
        hubconf.get_trained_model()
    message = str(error.value)
    assert "ResNet50_2048_cosplace.pth" in message and torch.hub.get_dir() in message and "\n" not in message
    assert error.value.__suppress_context__  # raised "from None": the traceback shows no urllib internals


# What building a model says and how fast it fails (student reports of issue 16)

def test_timm_weights_go_offline_at_once_when_the_hub_is_unreachable(monkeypatch):
    """huggingface_hub retried an unreachable hub for 47 s: with its host unreachable, the download runs in the hub's
    offline mode (cache or an immediate error), the error is one line, and the mode is restored afterwards."""
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    from model import backbones
    seen_offline = []

    def create(name, **kwargs):
        seen_offline.append(constants.is_offline_mode())
        raise LocalEntryNotFoundError("Cannot find the requested files in the local cache")

    def unreachable(address, timeout):
        raise socket.gaierror(-2, "Name or service not known")
    monkeypatch.setattr(backbones, "create_timm_features", create)
    monkeypatch.setattr(socket, "create_connection", unreachable)
    offline_before = constants.HF_HUB_OFFLINE
    with pytest.raises(backbones.PretrainedWeightsUnavailable) as error:
        backbones.get_backbone("convnext_atto", pretrained="imagenet")
    assert seen_offline == [True] and constants.HF_HUB_OFFLINE == offline_before
    assert "\n" not in str(error.value) and "--pretrained none" in str(error.value)


def test_a_model_for_evaluation_logs_no_training_stages(caplog):
    """eval.py said 'training the last 2 of 5 stages': the stages are frozen (and logged) for training only."""
    import logging

    import parser
    from model import network
    with caplog.at_level(logging.INFO):
        evaluated = network.GeoLocalizationNet(**parser.model_options(parser.parse_arguments("geolocalize", ["--pretrained", "none"])))
    assert "stages" not in caplog.text and all(p.requires_grad for p in evaluated.parameters())
    with caplog.at_level(logging.INFO):
        trained = network.GeoLocalizationNet(**parser.model_options(parser.parse_arguments("train", ["--pretrained", "none",
                                                                       "--dataset_folder", "d"])))
    assert "Backbone: training the last 2 of 5 stages (layer3, layer4)" in caplog.text
    assert [name for name, p in trained.backbone.named_parameters() if p.requires_grad][0].startswith("6.")


def test_mixvpr_logs_each_resized_map_size_once(caplog):
    import logging

    from model.aggregators import MixVPR
    mixvpr = MixVPR(in_channels=8, fc_output_dim=16, map_size=4)
    with caplog.at_level(logging.INFO):
        for height in (2, 2, 4, 6):
            mixvpr(torch.rand(1, 8, height, height))
    resized = [record.message for record in caplog.records if "MixVPR" in record.message]
    assert resized == ["MixVPR: feature maps of 2x2 are resized to 4x4 (--mixvpr_map_size 4, the map of 128 px images "
                       "with a stride-32 backbone)",
                       "MixVPR: feature maps of 6x6 are resized to 4x4 (--mixvpr_map_size 4, the map of 128 px images "
                       "with a stride-32 backbone)"]
