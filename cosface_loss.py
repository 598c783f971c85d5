"""Margin-based classifier heads: one per CosPlace group, trained with cross-entropy on their logits.

A registry maps --loss names to head classes; every head takes (descriptors, labels) and returns logits
s * cos(theta_j) for the other classes and s * (a margin-penalised function of theta) for the true class,
theta_j being the angle between the descriptor and the (L2-normalised) weight row of class j.
"""

import abc
import math

import torch
import torch.nn.functional as F
from torch import nn


class MarginHead(nn.Module, metaclass=abc.ABCMeta):
    """Normalised weights, one row per class; subclasses say how the true class's cosine is penalised."""

    default_margin = None  # the published margin of each head, used when m is None

    def __init__(self, in_features, out_features, s=30.0, m=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.s, self.m = s, self.default_margin if m is None else m
        self.weight = nn.Parameter(torch.Tensor(out_features, in_features))
        nn.init.xavier_uniform_(self.weight)

    def cosine(self, inputs):
        """In fp32 whatever the autocast (--amp): s = 30 times a cosine rounded to bf16's 8 bits would move the
        logits by up to 0.1, and this product costs little beside the backbone."""
        with torch.autocast(inputs.device.type, enabled=False):
            return F.linear(F.normalize(inputs.float()), F.normalize(self.weight.float()))

    @abc.abstractmethod
    def target_logit(self, cosine):
        """The true class's logit, divided by s, as a function of its cosine."""

    def forward(self, inputs, labels):
        cosine = self.cosine(inputs)
        one_hot = F.one_hot(labels, num_classes=self.out_features).bool()
        return self.s * torch.where(one_hot, self.target_logit(cosine), cosine)

    def __repr__(self):
        return (f"{type(self).__name__}(in_features={self.in_features}, out_features={self.out_features}, "
                f"s={self.s}, m={self.m})")


class MarginCosineProduct(MarginHead):
    """CosFace (Wang et al., 2018): logits = s * (cos(theta_j) - m * [j == label])."""

    default_margin = 0.40

    def target_logit(self, cosine):
        return cosine - self.m


class ArcFace(MarginHead):
    """ArcFace (Deng et al., 2019), additive angular margin: s * cos(theta + m) for the true class.

    cos(theta + m) stops decreasing once theta + m > pi; there (cos(theta) < cos(pi - m)) the logit continues
    as the CosFace-like s * (cos(theta) - m sin(m)), as in the ArcFace code. With easy_margin, the margin is only
    applied where cos(theta) > 0 (theta < pi / 2)."""

    default_margin = 0.5

    def __init__(self, in_features, out_features, s=30.0, m=None, easy_margin=False):
        super().__init__(in_features, out_features, s, m)
        if not 0 <= self.m < math.pi:
            raise ValueError(f"ArcFace margin {self.m} must be in [0, pi) radians (0.5 is the published one)")
        self.easy_margin = easy_margin

    def target_logit(self, cosine):
        cosine = cosine.float()  # the angle formulas lose precision in half precision
        sine = torch.sqrt((1.0 - cosine.pow(2)).clamp(min=1e-9))  # min > 0: a finite gradient at theta = 0
        cos_theta_plus_m = cosine * math.cos(self.m) - sine * math.sin(self.m)
        if self.easy_margin:
            return torch.where(cosine > 0, cos_theta_plus_m, cosine)
        return torch.where(cosine > math.cos(math.pi - self.m), cos_theta_plus_m,
                           cosine - self.m * math.sin(self.m))


class SphereFace(MarginHead):
    """SphereFace (Liu et al., 2017), multiplicative angular margin: s * psi(theta) for the true class, with
    psi(theta) = (-1)^k cos(m theta) - 2k for theta in [k pi / m, (k + 1) pi / m], the monotonic extension of
    cos(m theta) to [0, pi]. With normalised descriptors (as here) m = 1.35 is the margin of the ArcFace
    paper's comparison; the original m = 4 relies on feature-norm logits and a softmax annealing."""

    default_margin = 1.35

    def __init__(self, in_features, out_features, s=30.0, m=None):
        super().__init__(in_features, out_features, s, m)
        if self.m < 1:
            raise ValueError(f"SphereFace margin {self.m} must be at least 1 (1 is no margin; 1.35 or 4 are usual)")

    def target_logit(self, cosine):
        theta = torch.acos(cosine.float().clamp(-1 + 1e-7, 1 - 1e-7))  # acos has an infinite slope at +-1
        k = torch.floor(self.m * theta / math.pi).detach()
        sign = 1.0 - 2.0 * torch.remainder(k, 2)
        return sign * torch.cos(self.m * theta) - 2.0 * k


MARGIN_HEADS = {
    "cosface": MarginCosineProduct,
    "arcface": ArcFace,
    "sphereface": SphereFace,
}


def get_margin_head(name, in_features, out_features, s=30.0, m=None):
    """m None: the head's published margin (default_margin)."""
    if name not in MARGIN_HEADS:
        raise ValueError(f"Unknown loss {name}: choose one of {sorted(MARGIN_HEADS)}")
    return MARGIN_HEADS[name](in_features, out_features, s=s, m=m)
