"""Margin-based classifier heads: one per CosPlace group, trained with cross-entropy on their logits.

A registry maps --loss names to head classes; every head takes (descriptors, labels) and returns logits.
"""

import torch
import torch.nn.functional as F
from torch import nn


class MarginCosineProduct(nn.Module):
    """CosFace (Wang et al., 2018): logits = s * (cos(theta_j) - m * [j == label]).

    The weight has one row per class; both the rows and the descriptors are L2-normalised, so the logits
    are scaled cosine similarities with a margin m subtracted from the true class.
    """

    def __init__(self, in_features, out_features, s=30.0, m=0.40):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.s, self.m = s, m
        self.weight = nn.Parameter(torch.Tensor(out_features, in_features))
        nn.init.xavier_uniform_(self.weight)

    def cosine(self, inputs):
        return F.linear(F.normalize(inputs), F.normalize(self.weight))

    def forward(self, inputs, labels):
        cosine = self.cosine(inputs)
        one_hot = F.one_hot(labels, num_classes=self.out_features).to(cosine.dtype)
        return self.s * (cosine - one_hot * self.m)

    def __repr__(self):
        return (f"{type(self).__name__}(in_features={self.in_features}, out_features={self.out_features}, "
                f"s={self.s}, m={self.m})")


MARGIN_HEADS = {
    "cosface": MarginCosineProduct,
}


def get_margin_head(name, in_features, out_features, s=30.0, m=0.40):
    if name not in MARGIN_HEADS:
        raise ValueError(f"Unknown loss {name}: choose one of {sorted(MARGIN_HEADS)}")
    return MARGIN_HEADS[name](in_features, out_features, s=s, m=m)
