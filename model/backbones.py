"""Backbones: images [B, 3, H, W] -> feature map [B, C, h, w], so every aggregator works on every backbone.

Every backbone exposes `out_channels` (C), `stages()` (its parameters split into stages, input to output) and
`default_trainable_stages`, so `freeze_stages` trains only the last K stages of any of them.
The torchvision models of the BACKBONES registry keep CosPlace's layouts: a ResNet is an nn.Sequential of its
children (conv1, bn1, relu, maxpool, layer1..4), which gives the state-dict keys of the released CosPlace
checkpoints (backbone.0 ... backbone.7). Any other name (or timm/NAME) is a timm model.
"""

import contextlib
import functools
import logging
import os
import socket
import urllib.parse

import timm
import torch
import torchvision
from huggingface_hub import constants as hub_constants
from huggingface_hub.constants import HF_HUB_CACHE
from torch import nn

from core.errors import UserError


class PretrainedWeightsUnavailable(UserError, RuntimeError):
    """Raised with a message telling the user how to get the weights or train without them."""


def offline_message(backbone_name, error, cache_folder):
    """One line: what failed, and the three ways on."""
    reason = " ".join(str(error).split())
    return (f"Could not get the ImageNet weights of {backbone_name} ({type(error).__name__}: {reason}): this "
            f"machine seems to have no internet access. Run once with internet (the weights are cached under "
            f"{cache_folder}) or copy the weights file there, or pass --pretrained /path/to/weights.pth (a state "
            f"dict of the {backbone_name} classification model), or --pretrained none to start from a random "
            f"initialisation")


def check_weights_file(path, backbone_name):
    if not os.path.isfile(path):
        raise PretrainedWeightsUnavailable(f"--pretrained {path}: no such file (expected a state dict of {backbone_name}, "
                                           f"or 'imagenet' / 'none')")


def load_weights_file(model, path, backbone_name):
    check_weights_file(path, backbone_name)
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    state_dict = state_dict.get("state_dict", state_dict) if isinstance(state_dict, dict) else state_dict
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if len(missing) > len(state_dict) // 2 or not state_dict:
        raise PretrainedWeightsUnavailable(f"--pretrained {path} does not look like {backbone_name} weights: "
                                           f"{len(missing)} keys missing, e.g. {missing[:3]}")
    logging.info(f"Loaded backbone weights from {path} ({len(missing)} missing, {len(unexpected)} unexpected keys)")


def torchvision_model(name, pretrained):
    """A torchvision classification model with ImageNet weights ('imagenet'), none ('none') or from a file."""
    if pretrained == "imagenet":
        weights = torchvision.models.get_model_weights(name).DEFAULT
        try:
            return torchvision.models.get_model(name, weights=weights)
        except (OSError, RuntimeError, ValueError) as e:  # URLError is an OSError
            raise PretrainedWeightsUnavailable(offline_message(name, e, torch.hub.get_dir())) from None
    model = torchvision.models.get_model(name, weights=None)
    if pretrained not in ("none", None):
        load_weights_file(model, pretrained, name)
    return model


class TorchvisionBackbone(nn.Sequential):
    """Layers of a torchvision model as an nn.Sequential (keys backbone.0 ... as in the CosPlace checkpoints);
    stage i is made of the layers from stage_starts[i] to the next start."""

    def __init__(self, layers, out_channels, stage_names, stage_starts, default_trainable_stages):
        super().__init__(*layers)
        self.out_channels = out_channels
        self.stage_names, self.stage_starts = stage_names, stage_starts
        self.default_trainable_stages = default_trainable_stages

    def stages(self):
        ends = self.stage_starts[1:] + [len(self)]
        return [(name, [p for layer in list(self)[start:end] for p in layer.parameters()])
                for name, start, end in zip(self.stage_names, self.stage_starts, ends)]


def resnet_backbone(name, pretrained):
    """conv1..maxpool (the stem), layer1..4; CosPlace trains layer3 and layer4 (2 stages)."""
    resnet = torchvision_model(name, pretrained)
    layers = list(resnet.children())[:-2]  # remove the average pooling and the fully-connected layer
    return TorchvisionBackbone(layers, resnet.fc.in_features, ["stem", "layer1", "layer2", "layer3", "layer4"],
                               [0, 4, 5, 6, 7], default_trainable_stages=2)


def vgg16_backbone(name, pretrained):
    """The 5 convolutional blocks (each ends at a max pooling); CosPlace trains the last 5 layers, which are the
    convolutions and ReLUs of the last block (1 stage)."""
    vgg = torchvision_model(name, pretrained)
    layers = list(vgg.features.children())[:-2]  # remove the last ReLU and max pooling
    starts = [0] + [i + 1 for i, layer in enumerate(layers) if isinstance(layer, nn.MaxPool2d)]
    return TorchvisionBackbone(layers, layers[-1].out_channels, [f"block{i + 1}" for i in range(len(starts))],
                               starts, default_trainable_stages=1)


BACKBONES = {
    "resnet18": resnet_backbone,
    "resnet50": resnet_backbone,
    "resnet101": resnet_backbone,
    "resnet152": resnet_backbone,
    "vgg16": vgg16_backbone,
}


def create_timm_features(name, **kwargs):
    """timm's features_only model of name, giving only its last feature map; ViT-like models are asked to take
    any image size (the other models refuse these keywords)."""
    create = functools.partial(timm.create_model, name, features_only=True, out_indices=(-1,), **kwargs)
    for size_options in ({"dynamic_img_size": True, "dynamic_img_pad": True}, {"dynamic_img_size": True}):
        try:
            return create(**size_options)
        except TypeError as e:
            if "dynamic_img" not in str(e):
                raise
    return create()


@contextlib.contextmanager
def hub_offline_unless_reachable(timeout=5):
    """huggingface_hub's offline mode inside the block when its host does not answer within timeout seconds: cached
    weights then load at once and missing ones fail at once, where the hub's retries took 47 s."""
    endpoint = urllib.parse.urlparse(hub_constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
        reachable = True
    except OSError:  # a DNS failure, no route, a timeout
        reachable = False
    offline = hub_constants.HF_HUB_OFFLINE
    hub_constants.HF_HUB_OFFLINE = offline or not reachable  # read at each request (is_offline_mode)
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = offline


class TimmBackbone(nn.Module):
    """The last feature map of a timm model. For ViT-like models timm's features_only wrapper drops the CLS and
    register tokens and reshapes the patch tokens into a [B, C, H/patch, W/patch] map (dynamic_img_size=True,
    so any image size works; dynamic_img_pad pads sizes that are not multiples of the patch)."""

    default_trainable_stages = 2

    def __init__(self, name, pretrained):
        super().__init__()
        self.name = name
        self.model = self.create(name, pretrained)
        self.out_channels = self.model.feature_info.channels()[-1]
        # e.g. Swin gives NHWC maps; timm's own feature classes (EfficientNetFeatures...) have no output_fmt: NCHW
        self.channels_last_output = getattr(self.model, "output_fmt", "NCHW") == "NHWC"

    @staticmethod
    def create(name, pretrained):
        if pretrained in ("none", None):
            return create_timm_features(name, pretrained=False)
        if pretrained != "imagenet":
            check_weights_file(pretrained, name)
            try:
                return create_timm_features(name, pretrained=True, pretrained_cfg_overlay={"file": pretrained})
            except (RuntimeError, KeyError, ValueError) as e:
                raise PretrainedWeightsUnavailable(f"--pretrained {pretrained} does not fit the timm model {name} "
                                                   f"({type(e).__name__}: {str(e)[:300]})") from None
        if not timm.list_pretrained(name):
            raise PretrainedWeightsUnavailable(f"timm has no pretrained weights for {name}: pass --pretrained none, "
                                               f"or a weights file, or pick one of timm.list_models(pretrained=True)")
        try:
            with hub_offline_unless_reachable():
                return create_timm_features(name, pretrained=True)
        except OSError as e:  # huggingface_hub's LocalEntryNotFoundError, URLError
            raise PretrainedWeightsUnavailable(offline_message(name, e, HF_HUB_CACHE)) from None

    def forward(self, images):
        features = self.model(images)[-1]
        return features.permute(0, 3, 1, 2) if self.channels_last_output else features

    def stages(self):
        """Stage i is feature_info's module i (a ResNet layer, a ConvNeXt stage, a ViT block...) with the layers
        between it and the previous one (the stem goes with the first); layers after the last go with the last."""
        module_names = [info["module"] for info in self.model.feature_info.info]
        # features_only wrappers name a module m as m, m with '_' for '.' (FeatureListNet) or model.m (getter)
        prefixes = [(f"{m}.", f"{m.replace('.', '_')}.", f"model.{m}.") for m in module_names]
        stages = [(m, []) for m in module_names]
        last_matched = -1
        for parameter_name, parameter in self.model.named_parameters():
            matched = [i for i, p in enumerate(prefixes) if parameter_name.startswith(p)]
            if matched:
                last_matched = matched[0]
            stages[matched[0] if matched else min(last_matched + 1, len(stages) - 1)][1].append(parameter)
        if last_matched == -1:
            raise ValueError(f"Cannot split the timm model {self.name} into stages (feature modules {module_names} "
                             f"not found): use --train_all_layers")
        return stages


def freeze_stages(backbone, trainable_stages=None, train_all_layers=False):
    """Freezes all but the last trainable_stages stages (None: the backbone's default, CosPlace's for ResNets
    and VGG16); train_all_layers keeps every parameter trainable. Logs what is frozen."""
    stages = backbone.stages()
    if train_all_layers:
        trainable_stages = len(stages)
    elif trainable_stages is None:
        trainable_stages = backbone.default_trainable_stages
    if not 0 <= trainable_stages <= len(stages):
        raise BackboneError(f"--trainable_stages {trainable_stages}: this backbone has {len(stages)} stages "
                         f"({', '.join(name for name, _ in stages)})")
    frozen = stages[:len(stages) - trainable_stages]
    for _, parameters in frozen:
        for parameter in parameters:
            parameter.requires_grad = False
    frozen_count = sum(p.numel() for _, parameters in frozen for p in parameters)
    total_count = sum(p.numel() for p in backbone.parameters())
    logging.info(f"Backbone: training the last {trainable_stages} of {len(stages)} stages "
                 f"({', '.join(name for name, _ in stages[len(frozen):]) or 'none'}); frozen: "
                 f"{', '.join(name for name, _ in frozen) or 'none'} ({frozen_count:,} of {total_count:,} parameters)")


class BackboneError(UserError, ValueError):
    """A backbone that does not exist, or stages it does not have."""


def check_backbone_name(name):
    """A BackboneError unless name is a BACKBONES key or a timm model (timm/NAME forces timm)."""
    timm_name = name.removeprefix("timm/")
    if name not in BACKBONES and not timm.is_model(timm.models.split_model_name_tag(timm_name)[0]):
        raise BackboneError(f"--backbone {name} is unknown: choose one of {', '.join(BACKBONES)} (torchvision) or a "
                            f"timm model (python -c \"import timm; print(timm.list_models('*convnext*'))\" lists "
                            f"them; timm/NAME picks timm's version of a torchvision name)")


def get_backbone(name, pretrained="imagenet", train_all_layers=False, trainable_stages=None, for_training=True):
    """The backbone called name (a BACKBONES key, else a timm model; timm/NAME forces timm), with its early
    stages frozen as freeze_stages says; for_training=False (evaluation scripts) freezes and logs nothing, since
    nothing trains there."""
    check_backbone_name(name)
    if name in BACKBONES:
        backbone = BACKBONES[name](name, pretrained)
    else:
        backbone = TimmBackbone(name.removeprefix("timm/"), pretrained)
    if for_training:
        freeze_stages(backbone, trainable_stages, train_all_layers)
    return backbone
