"""Backbones: a registry from name to a constructor returning (feature-map module, channels of its output).

Every backbone maps images [B, 3, H, W] to a feature map [B, C, h, w], so every aggregator works on it.
torchvision ResNets are an nn.Sequential of their children (conv1, bn1, relu, maxpool, layer1..4), which gives
the state-dict keys of the released CosPlace checkpoints (backbone.0 ... backbone.7).
"""

import logging
import os

import torch
import torchvision
from torch import nn

TORCHVISION_CHANNELS = {"resnet18": 512, "resnet50": 2048, "resnet101": 2048, "resnet152": 2048, "vgg16": 512}


class PretrainedWeightsUnavailable(RuntimeError):
    """Raised with a message telling the user how to get the weights or train without them."""


def offline_message(backbone_name, error):
    return (f"Could not get the ImageNet weights of {backbone_name} ({type(error).__name__}: {error}).\n"
            f"This machine seems to have no internet access. Either:\n"
            f"  - run once with internet (the weights are cached under {torch.hub.get_dir()}), or copy the weights "
            f"file there, or\n"
            f"  - pass --pretrained /path/to/weights.pth (a state dict of the {backbone_name} classification model), or\n"
            f"  - pass --pretrained none to start from a random initialisation.")


def load_weights_file(model, path, backbone_name):
    if not os.path.isfile(path):
        raise PretrainedWeightsUnavailable(f"--pretrained {path}: no such file (expected a state dict of {backbone_name}, "
                                           f"or 'imagenet' / 'none')")
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
            raise PretrainedWeightsUnavailable(offline_message(name, e)) from None
    model = torchvision.models.get_model(name, weights=None)
    if pretrained not in ("none", None):
        load_weights_file(model, pretrained, name)
    return model


def resnet_backbone(name, pretrained, train_all_layers=False):
    resnet = torchvision_model(name, pretrained)
    if not train_all_layers:  # freeze the layers before layer3, as CosPlace does
        for child_name, child in resnet.named_children():
            if child_name == "layer3":
                break
            for parameter in child.parameters():
                parameter.requires_grad = False
    layers = list(resnet.children())[:-2]  # remove the average pooling and the fully-connected layer
    return nn.Sequential(*layers), TORCHVISION_CHANNELS[name]


def vgg16_backbone(name, pretrained, train_all_layers=False):
    vgg = torchvision_model(name, pretrained)
    layers = list(vgg.features.children())[:-2]  # remove the last ReLU and max pooling
    if not train_all_layers:  # train only the last 5 layers, as CosPlace does
        for layer in layers[:-5]:
            for parameter in layer.parameters():
                parameter.requires_grad = False
    return nn.Sequential(*layers), TORCHVISION_CHANNELS[name]


BACKBONES = {
    "resnet18": resnet_backbone,
    "resnet50": resnet_backbone,
    "resnet101": resnet_backbone,
    "resnet152": resnet_backbone,
    "vgg16": vgg16_backbone,
}


def get_backbone(name, pretrained="imagenet", train_all_layers=False):
    """Returns (backbone module, output channels)."""
    if name not in BACKBONES:
        raise ValueError(f"Unknown backbone {name}: choose one of {sorted(BACKBONES)}")
    return BACKBONES[name](name, pretrained, train_all_layers)
