"""Aggregators: a registry from name to a constructor (in_channels, fc_output_dim, **options) -> module that turns
a feature map [B, C, h, w] into an L2-normalised descriptor [B, fc_output_dim].

The options of aggregator NAME come from the flags --NAME_OPTION (e.g. --mixvpr_depth -> depth), see
parser.model_options. An aggregator that needs data to be initialised (NetVLAD's clusters) has a method
initialize_from_features(feature_maps), which train.py calls with the backbone's maps of a few training images.
"""

import logging
import math

import faiss
import torch
import torch.nn.functional as F
from torch import nn

from model.layers import BoQBlock, FeatureMixer, GeM, Flatten, L2Norm


def gem_aggregation(in_channels, fc_output_dim):
    """CosPlace's head. Kept as an nn.Sequential so its keys match the released checkpoints
    (aggregation.1.p, aggregation.3.weight, aggregation.3.bias)."""
    return nn.Sequential(L2Norm(), GeM(), Flatten(), nn.Linear(in_channels, fc_output_dim), L2Norm())


def split_descriptor(fc_output_dim, rows, flag):
    """Channels per row of a descriptor made of `rows` rows (MixVPR, BoQ), with an error naming the flags."""
    if fc_output_dim % rows:
        raise ValueError(f"--fc_output_dim {fc_output_dim} must be a multiple of {flag} {rows}: the descriptor is "
                         f"{rows} rows of fc_output_dim / {rows} channels")
    return fc_output_dim // rows


class MixVPR(nn.Module):
    """MixVPR (Ali-bey et al., WACV 2023): feature-mixer blocks (MLPs over the flattened spatial map of each
    channel), then a channel projection to fc_output_dim / out_rows and a row projection of the h*w positions to
    out_rows rows, flattened and L2-normalised.

    The mixers need a fixed map size: the map is average-pooled (or up-sampled) to map_size x map_size, so any
    image size works; the default 16 is the map of CosPlace's 512 px images with a stride-32 backbone."""

    def __init__(self, in_channels, fc_output_dim, depth=4, out_rows=4, map_size=16, mlp_ratio=1):
        super().__init__()
        self.map_size = (map_size, map_size)
        self.resized_sizes = set()  # the map sizes whose resizing was logged
        positions = map_size * map_size
        self.mix = nn.Sequential(*[FeatureMixer(positions, mlp_ratio) for _ in range(depth)])
        self.channel_projection = nn.Linear(in_channels, split_descriptor(fc_output_dim, out_rows, "--mixvpr_out_rows"))
        self.row_projection = nn.Linear(positions, out_rows)

    def forward(self, x):
        if x.shape[-2:] != self.map_size:
            # logged once per size (a silent resize hid a wrong setting), outside torch.compile's graphs
            if not torch.compiler.is_compiling() and tuple(x.shape[-2:]) not in self.resized_sizes:
                self.resized_sizes.add(tuple(x.shape[-2:]))
                logging.info(f"MixVPR: feature maps of {x.shape[-2]}x{x.shape[-1]} are resized to "
                             f"{self.map_size[0]}x{self.map_size[1]} (--mixvpr_map_size {self.map_size[0]}, the map "
                             f"of {32 * self.map_size[0]} px images with a stride-32 backbone)")
            x = F.adaptive_avg_pool2d(x, self.map_size)
        x = self.mix(x.flatten(2))  # [B, C, h*w]
        x = self.channel_projection(x.transpose(1, 2))  # [B, h*w, D / rows]
        x = self.row_projection(x.transpose(1, 2))  # [B, D / rows, rows]
        return F.normalize(x.flatten(1), dim=1)


class NetVLAD(nn.Module):
    """NetVLAD (Arandjelovic et al., CVPR 2016): local descriptors (L2-normalised) are soft-assigned to `clusters`
    centroids by a 1x1 convolution, their residuals to each centroid summed, intra-normalised and L2-normalised;
    a linear projection (the original's PCA) to fc_output_dim and a last L2 give the descriptor.

    initialize_from_features sets the centroids by k-means on local descriptors of training images and the
    assignment to alpha * centroid (alpha from the distances), as the original does before training."""

    def __init__(self, in_channels, fc_output_dim, clusters=64, descriptors_per_image=100):
        super().__init__()
        self.clusters, self.descriptors_per_image = clusters, descriptors_per_image
        self.centroids = nn.Parameter(torch.rand(clusters, in_channels))
        self.assignment = nn.Conv2d(in_channels, clusters, kernel_size=1, bias=False)
        self.projection = nn.Linear(clusters * in_channels, fc_output_dim)

    def forward(self, x):
        x = F.normalize(x, dim=1)
        soft_assignment = F.softmax(self.assignment(x).flatten(2), dim=1)  # [B, K, h*w]
        # sum_i a_k(i) (x_i - c_k) = sum_i a_k(i) x_i - (sum_i a_k(i)) c_k, without a [B, K, C, h*w] tensor
        vlad = soft_assignment @ x.flatten(2).transpose(1, 2) - soft_assignment.sum(2, keepdim=True) * self.centroids
        vlad = F.normalize(F.normalize(vlad, dim=2).flatten(1), dim=1)  # intra-normalisation, then L2
        return F.normalize(self.projection(vlad), dim=1)

    @torch.no_grad()
    def sample_descriptors(self, feature_maps, generator):
        """Up to descriptors_per_image random L2-normalised local descriptors of each image, [N, C] float32."""
        sampled = []
        for maps in feature_maps:
            local = F.normalize(maps.float(), dim=1).flatten(2).transpose(1, 2).cpu()  # [B, h*w, C]
            order = torch.rand(local.shape[:2], generator=generator).argsort(dim=1)[:, :self.descriptors_per_image]
            sampled.append(local[torch.arange(len(local)).unsqueeze(1), order].flatten(0, 1))
        return torch.cat(sampled).numpy()

    @torch.no_grad()
    def initialize_from_features(self, feature_maps, seed=0):
        """feature_maps: iterable of backbone outputs [B, C, h, w]. k-means (faiss, 100 iterations) on sampled local
        descriptors gives the centroids; alpha = -log(0.01) / mean(gap between each descriptor's two largest
        similarities to the normalised centroids), so a descriptor's assignment to its nearest centroid is ~100x
        the second's; the assignment weights are alpha * normalised centroid (NetVLAD's init)."""
        descriptors = self.sample_descriptors(feature_maps, torch.Generator().manual_seed(seed))
        if len(descriptors) < self.clusters:
            raise ValueError(f"NetVLAD initialisation: {len(descriptors)} local descriptors for {self.clusters} "
                             f"clusters: use more images (--aggregator_init_images) or fewer --netvlad_clusters")
        kmeans = faiss.Kmeans(descriptors.shape[1], self.clusters, niter=100, seed=seed, verbose=False)
        kmeans.train(descriptors)
        centroids = torch.from_numpy(kmeans.centroids)
        normalised = F.normalize(centroids, dim=1)
        top2 = torch.topk(torch.from_numpy(descriptors) @ normalised.T, k=2, dim=1).values
        alpha = -math.log(0.01) / (top2[:, 0] - top2[:, 1]).mean().item()
        self.centroids.copy_(centroids)
        self.assignment.weight.copy_(alpha * normalised[:, :, None, None])
        logging.info(f"NetVLAD: {self.clusters} centroids from k-means on {len(descriptors)} local descriptors, "
                     f"alpha {alpha:.1f}")


class BoQ(nn.Module):
    """Bag-of-Queries (Ali-bey et al., CVPR 2024): a 3x3 convolution projects the map to fc_output_dim / out_rows
    channels, its tokens go through `layers` BoQ blocks whose learnable queries cross-attend to them; the outputs
    of all the queries are projected to out_rows rows, flattened and L2-normalised. Works at any map size."""

    def __init__(self, in_channels, fc_output_dim, queries=32, layers=2, out_rows=4):
        super().__init__()
        dim = split_descriptor(fc_output_dim, out_rows, "--boq_out_rows")
        heads = max(1, dim // 64)  # 64 channels per head, as in BoQ
        if dim % heads:
            raise ValueError(f"BoQ: {dim} channels (--fc_output_dim / --boq_out_rows) do not split into {heads} "
                             f"attention heads of 64: use a multiple of 64, or fewer than 128")
        self.projection = nn.Conv2d(in_channels, dim, kernel_size=3, padding=1)
        self.norm_input = nn.LayerNorm(dim)
        self.blocks = nn.ModuleList([BoQBlock(dim, queries, heads) for _ in range(layers)])
        self.row_projection = nn.Linear(layers * queries, out_rows)

    def forward(self, x):
        tokens = self.norm_input(self.projection(x).flatten(2).transpose(1, 2))  # [B, h*w, dim]
        outputs = []
        for block in self.blocks:
            tokens, out = block(tokens)
            outputs.append(out)
        x = self.row_projection(torch.cat(outputs, dim=1).transpose(1, 2))  # [B, dim, rows]
        return F.normalize(x.flatten(1), dim=1)


AGGREGATORS = {
    "gem": gem_aggregation,
    "mixvpr": MixVPR,
    "netvlad": NetVLAD,
    "boq": BoQ,
}


def get_aggregator(name, in_channels, fc_output_dim, **options):
    if name not in AGGREGATORS:
        raise ValueError(f"Unknown aggregator {name}: choose one of {sorted(AGGREGATORS)}")
    return AGGREGATORS[name](in_channels, fc_output_dim, **options)
