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


class FeatureMixer(nn.Module):
    """MixVPR's feature-mixer block: x + MLP(LayerNorm(x)), the MLP acting on the flattened spatial dimension
    of each channel (the last dimension of x [B, C, h*w])."""

    def __init__(self, dim, mlp_ratio=1):
        super().__init__()
        self.mix = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, int(dim * mlp_ratio)), nn.ReLU(),
                                 nn.Linear(int(dim * mlp_ratio), dim))
        for module in self.mix:
            if isinstance(module, nn.Linear):  # as the MixVPR code
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x):
        return x + self.mix(x)


class BoQBlock(nn.Module):
    """One BoQ block: a transformer encoder layer refines the tokens; learnable queries (stabilised by a
    self-attention, as in the BoQ code) cross-attend to them. Returns (refined tokens, queries' outputs)."""

    def __init__(self, dim, num_queries, heads):
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(d_model=dim, nhead=heads, dim_feedforward=4 * dim, dropout=0.0,
                                                  batch_first=True)
        self.queries = nn.Parameter(torch.randn(1, num_queries, dim))
        self.self_attention = nn.MultiheadAttention(dim, num_heads=heads, batch_first=True)
        self.norm_queries = nn.LayerNorm(dim)
        self.cross_attention = nn.MultiheadAttention(dim, num_heads=heads, batch_first=True)
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, tokens):
        tokens = self.encoder(tokens)
        queries = self.queries.expand(tokens.size(0), -1, -1)
        queries = self.norm_queries(queries + self.self_attention(queries, queries, queries, need_weights=False)[0])
        out = self.cross_attention(queries, tokens, tokens, need_weights=False)[0]
        return tokens, self.norm_out(out)
