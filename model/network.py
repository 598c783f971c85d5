"""The geo-localization network: backbone (feature map) + aggregation (L2-normalised global descriptor)."""

import logging

import torch
from torch import nn

from model.aggregators import get_aggregator
from model.backbones import get_backbone


class GeoLocalizationNet(nn.Module):
    def __init__(self, backbone="resnet18", fc_output_dim=512, aggregator="gem", pretrained="imagenet",
                 train_all_layers=False, trainable_stages=None, aggregator_options=None, freeze_bn_stats="none",
                 for_training=True):
        super().__init__()
        self.backbone = get_backbone(backbone, pretrained, train_all_layers, trainable_stages, for_training)
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


class ModelWithHead(nn.Module):
    """Model, the current group's head and the auxiliary losses as one module, so that DDP synchronises the
    gradients of all. Each auxiliary loss compares the batch's descriptors with the descriptors of its own
    extra images (made by its extra_images: a second view of the batch for SSL, target images for DANN)."""

    def __init__(self, model, head, auxiliary_losses=()):
        super().__init__()
        self.model, self.head = model, head
        self.auxiliary_losses = nn.ModuleList(auxiliary_losses)

    def forward(self, images, targets, auxiliary_images=()):
        """The head's logits, and the (weighted) value of each auxiliary loss."""
        descriptors = self.model(images)
        return self.head(descriptors, targets), [loss(descriptors, self.model(extra_images), targets)
                                                 for loss, extra_images in zip(self.auxiliary_losses, auxiliary_images)]
