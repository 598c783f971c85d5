"""Small layers shared by the aggregators."""

import torch
import torch.nn.functional as F
from torch import nn


class L2Norm(nn.Module):
    def __init__(self, dim=1):
        super().__init__()
        self.dim = dim

    def forward(self, x):
        return F.normalize(x, p=2.0, dim=self.dim)


def gem(x, p, eps=1e-6):
    """Generalized-mean pooling over the spatial dimensions: (mean(x^p))^(1/p), p=1 average, p->inf max."""
    return F.avg_pool2d(x.clamp(min=eps).pow(p), (x.size(-2), x.size(-1))).pow(1.0 / p)


class GeM(nn.Module):
    """GeM pooling with a learnable exponent p (initialised at 3, as in CosPlace)."""

    def __init__(self, p=3, eps=1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.ones(1) * p)
        self.eps = eps

    def forward(self, x):
        return gem(x, p=self.p, eps=self.eps)

    def __repr__(self):
        return f"GeM(p={self.p.data.tolist()[0]:.4f}, eps={self.eps})"


class Flatten(nn.Module):
    def forward(self, x):
        return x.flatten(1)
