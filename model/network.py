"""The geo-localization network: backbone (feature map) + aggregation (L2-normalised global descriptor)."""

import logging
import os
import pickle
import zipfile

import torch
from torch import nn

from model.aggregators import get_aggregator, options_from_args
from model.backbones import get_backbone


class GeoLocalizationNet(nn.Module):
    def __init__(self, backbone="resnet18", fc_output_dim=512, aggregator="gem", pretrained="imagenet",
                 train_all_layers=False, trainable_stages=None, aggregator_options=None, freeze_bn_stats="none"):
        super().__init__()
        self.backbone = get_backbone(backbone, pretrained, train_all_layers, trainable_stages)
        self.frozen_batchnorms = frozen_batchnorms(self.backbone, freeze_bn_stats)
        self.aggregation = get_aggregator(aggregator, self.backbone.out_channels, fc_output_dim,
                                          **(aggregator_options or {}))
        self.fc_output_dim = fc_output_dim

    def forward(self, x):
        return self.aggregation(self.backbone(x))

    def train(self, mode=True):
        """As nn.Module.train, but the BatchNorm layers of --freeze_bn_stats stay in eval mode: they normalise
        with, and keep, their running statistics (their weights still get gradients)."""
        super().train(mode)
        for batchnorm in self.frozen_batchnorms:
            batchnorm.eval()
        return self

    @torch.no_grad()
    def initialize_aggregation(self, images_batches):
        """Data-dependent initialisation of the aggregation (NetVLAD's clusters) from the backbone's maps of
        the given batches of normalised images; the backbone runs in eval mode (its BatchNorm statistics stay)."""
        was_training = self.training
        self.eval()
        self.aggregation.initialize_from_features(self.backbone(images) for images in images_batches)
        self.train(was_training)


def frozen_batchnorms(backbone, which):
    """The backbone's BatchNorm layers whose running statistics stay fixed in training: none, those of the
    frozen stages (no trainable parameter), or all."""
    batchnorms = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if which == "frozen_stages":
        batchnorms = [bn for bn in batchnorms if not any(p.requires_grad for p in bn.parameters())]
    elif which == "none":
        batchnorms = []
    if which != "none":
        logging.info(f"BatchNorm statistics frozen (--freeze_bn_stats {which}) in {len(batchnorms)} layers")
    return batchnorms


def build_model(args):
    """The model described by the parsed arguments (one place, so train/eval/geolocalize agree). Weights that a
    checkpoint (--resume_model, --resume_train) will replace are never fetched: that works offline."""
    from_checkpoint = getattr(args, "resume_model", None) or getattr(args, "resume_train", None)
    return GeoLocalizationNet(args.backbone, args.fc_output_dim, args.aggregator,
                              "none" if from_checkpoint else args.pretrained,
                              args.train_all_layers, args.trainable_stages, options_from_args(args.aggregator, args),
                              getattr(args, "freeze_bn_stats", "none"))


class CheckpointError(ValueError):
    """A weights file that is missing, not a checkpoint, or made for another architecture."""


def read_checkpoint(path):
    """Loads a checkpoint file, or raises CheckpointError saying what is wrong with it."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, AttributeError, ValueError) as e:
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({type(e).__name__}: {e})") from None


def extract_model_state_dict(checkpoint, path):
    """Accepts a plain state dict (our best_model.pth, the released CosPlace weights), one of our training
    checkpoints (key model_state_dict), and DDP state dicts (keys prefixed by 'module.')."""
    if isinstance(checkpoint, dict) and "model_state_dict" in checkpoint:
        checkpoint = checkpoint["model_state_dict"]
    if not isinstance(checkpoint, dict) or not all(isinstance(k, str) for k in checkpoint):
        raise CheckpointError(f"{path} is not a model checkpoint: expected a state dict")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in checkpoint.items()}


def state_dict_mismatch(module, state_dict):
    """Why state_dict cannot be loaded into module: the keys missing or unexpected and the shapes that differ
    ('' when it fits)."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
                    for k, v in expected.items() if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    details = []
    if missing:
        details.append(f"{len(missing)} keys missing from the checkpoint, e.g. {missing[:4]}")
    if unexpected:
        details.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[:4]}")
    if wrong_shapes:
        details.append(f"{len(wrong_shapes)} shapes differ, e.g. {wrong_shapes[:3]}")
    return "; ".join(details)


def load_model_weights(model, path, checkpoint=None):
    """Loads weights into model (from checkpoint if already read from path), with an error naming the keys
    and shapes that do not match."""
    state_dict = extract_model_state_dict(read_checkpoint(path) if checkpoint is None else checkpoint, path)
    mismatch = state_dict_mismatch(model, state_dict)
    if mismatch:
        raise CheckpointError(f"{path} does not fit this model (--backbone, --aggregator, --fc_output_dim?): "
                              + mismatch)
    model.load_state_dict(state_dict)
