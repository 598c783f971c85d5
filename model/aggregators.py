"""Aggregators: a registry from name to a constructor (in_channels, fc_output_dim) -> module that turns a
feature map [B, C, h, w] into an L2-normalised descriptor [B, fc_output_dim]."""

from torch import nn

from model.layers import GeM, Flatten, L2Norm


def gem_aggregation(in_channels, fc_output_dim):
    """CosPlace's head. Kept as an nn.Sequential so its keys match the released checkpoints
    (aggregation.1.p, aggregation.3.weight, aggregation.3.bias)."""
    return nn.Sequential(L2Norm(), GeM(), Flatten(), nn.Linear(in_channels, fc_output_dim), L2Norm())


AGGREGATORS = {
    "gem": gem_aggregation,
}


def get_aggregator(name, in_channels, fc_output_dim):
    if name not in AGGREGATORS:
        raise ValueError(f"Unknown aggregator {name}: choose one of {sorted(AGGREGATORS)}")
    return AGGREGATORS[name](in_channels, fc_output_dim)
