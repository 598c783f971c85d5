"""Backbones, aggregators and the network: descriptor shapes and norms at two image sizes, gradients of trainable
and frozen stages, the CosPlace checkpoint layout, aggregators against their formulas, NetVLAD's k-means
initialisation, pretrained-weight handling, and a few-iteration training run per new aggregator / loss."""

import json
import math
import os

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from huggingface_hub.errors import LocalEntryNotFoundError
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans

import parser
from conftest import tiny_training_args, train_in_process
from model import aggregators, backbones
from model.network import GeoLocalizationNet

BACKBONE_NAMES = ["resnet18", "vgg16", "timm/efficientnet_b0", "vit_tiny_patch16_224"]
AGGREGATOR_OPTIONS = {"gem": {}, "mixvpr": {"depth": 2, "map_size": 3}, "netvlad": {"clusters": 4},
                      "boq": {"queries": 4, "layers": 2, "out_rows": 2}}
DIM = 32


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def backbone_of():
    """Backbones with their default frozen stages, built once per name (VGG16 takes seconds)."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = backbones.get_backbone(name, pretrained="none")
        return cache[name]
    return get


def test_aggregators_flag_lists_the_registry():
    assert set(aggregators.AGGREGATORS) == {"gem", "mixvpr", "netvlad", "boq"}
    help_text = " ".join(parser.build_parser("train").format_help().split())  # the names read from the source
    assert "descriptor: gem, mixvpr, netvlad, boq" in help_text


@pytest.mark.parametrize("aggregator", list(AGGREGATOR_OPTIONS))
@pytest.mark.parametrize("backbone_name", BACKBONE_NAMES)
def test_descriptors_and_gradients(backbone_of, backbone_name, aggregator):
    """[B, DIM] unit descriptors at two image sizes, the same from channels_last images (--channels_last, on by
    default); gradients reach every trainable parameter, no frozen one."""
    torch.manual_seed(0)
    backbone = backbone_of(backbone_name)
    backbone.zero_grad(set_to_none=True)
    aggregation = aggregators.get_aggregator(aggregator, backbone.out_channels, DIM, **AGGREGATOR_OPTIONS[aggregator])
    for size in (64, 96):
        descriptors = aggregation(backbone(torch.randn(2, 3, size, size)))
        assert descriptors.shape == (2, DIM)
        torch.testing.assert_close(descriptors.norm(dim=1), torch.ones(2))
        (descriptors * torch.randn_like(descriptors)).sum().backward()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        contiguous = aggregation(backbone(images))
        channels_last = aggregation(backbone(images.contiguous(memory_format=torch.channels_last)))
    torch.testing.assert_close(channels_last, contiguous, atol=1e-5, rtol=1e-4)
    trainable = [p for p in backbone.parameters() if p.requires_grad]
    frozen = [p for p in backbone.parameters() if not p.requires_grad]
    assert trainable and frozen
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)
    assert any(p.grad.abs().sum() > 0 for p in trainable)
    assert all(p.grad is None for p in frozen)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in aggregation.parameters())


@pytest.mark.parametrize("aggregator", list(AGGREGATOR_OPTIONS))
@pytest.mark.parametrize("backbone_name", BACKBONE_NAMES)
def test_bf16_autocast_on_the_cpu(backbone_of, backbone_name, aggregator):
    """--amp / --eval_amp bf16 on the CPU, for every backbone and aggregator: the descriptors are computed in bf16
    and are close to the fp32 ones, the gradients are finite. Random weights on noise amplify rounding (a random
    EfficientNet-B0 + MixVPR: cosine 0.94): 0.9 here; ResNet-18 on the demo images is held to 0.99 and the same
    top-1 (tests/test_bf16.py), trained models to their recalls (docs/speed.md)."""
    torch.manual_seed(0)
    backbone = backbone_of(backbone_name)
    aggregation = aggregators.get_aggregator(aggregator, backbone.out_channels, DIM, **AGGREGATOR_OPTIONS[aggregator])
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fp32 = aggregation(backbone(images))
    backbone.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = aggregation(backbone(images))
    assert bf16.dtype == torch.bfloat16
    assert F.cosine_similarity(bf16.float(), fp32).min() > 0.9
    (bf16.float() * torch.randn_like(fp32)).sum().backward()
    trainable = [p for p in [*backbone.parameters(), *aggregation.parameters()] if p.requires_grad]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)


def test_resnet18_gem_keys_are_cosplace_ones():
    """The released CosPlace checkpoints: backbone.<index of the ResNet child>..., aggregation.1.p, aggregation.3."""
    resnet_children = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    expected = {}
    for key, value in torchvision.models.resnet18().state_dict().items():
        child, rest = key.split(".", 1)
        if child != "fc":
            expected[f"backbone.{resnet_children.index(child)}.{rest}"] = value.shape
    expected.update({"aggregation.1.p": (1,), "aggregation.3.weight": (512, 512), "aggregation.3.bias": (512,)})
    state_dict = GeoLocalizationNet("resnet18", 512, "gem", pretrained="none").state_dict()
    assert {k: tuple(v.shape) for k, v in state_dict.items()} == {k: tuple(v) for k, v in expected.items()}
    assert "backbone.0.weight" in state_dict and "backbone.4.0.conv1.weight" in state_dict


def trainable_names(backbone):
    return {name for name, p in backbone.named_parameters() if p.requires_grad}


def test_cosplace_default_freezing(backbone_of):
    resnet = backbone_of("resnet18")  # CosPlace trains layer3 and layer4 (children 6 and 7)
    assert trainable_names(resnet) == {n for n, _ in resnet.named_parameters() if n.split(".")[0] in ("6", "7")}
    vgg = backbone_of("vgg16")  # CosPlace trains the last 5 of the 29 layers kept
    assert len(vgg) == 29
    assert trainable_names(vgg) == {n for n, _ in vgg.named_parameters() if int(n.split(".")[0]) >= 24}


def test_trainable_stages_of_timm_models():
    efficientnet = backbones.get_backbone("efficientnet_b0", pretrained="none", trainable_stages=1)
    names = trainable_names(efficientnet)  # the last stage: blocks.5 and blocks.6 (feature_info's blocks.6)
    last_stage = ("model.blocks.5.", "model.blocks.6.")
    assert names and names == {n for n, _ in efficientnet.named_parameters() if n.startswith(last_stage)}
    vit = backbones.get_backbone("vit_tiny_patch16_224", pretrained="none", trainable_stages=3)
    assert {n.split(".")[3] for n in trainable_names(vit)} == {"9", "10", "11"}  # model.model.blocks.N...
    assert not vit.model.model.cls_token.requires_grad and not vit.model.model.patch_embed.proj.weight.requires_grad


@pytest.mark.parametrize("name", ["resnet18", "timm/resnet18", "convnext_atto", "vit_tiny_patch16_224"])
def test_stages_split_every_parameter_once(name):
    backbone = backbones.get_backbone(name, pretrained="none", train_all_layers=True)
    stage_parameters = [id(p) for _, parameters in backbone.stages() for p in parameters]
    assert sorted(stage_parameters) == sorted(id(p) for p in backbone.parameters())
    assert all(p.requires_grad for p in backbone.parameters())
    frozen_all = backbones.get_backbone(name, pretrained="none", trainable_stages=0)
    assert not any(p.requires_grad for p in frozen_all.parameters())


def test_too_many_trainable_stages_is_a_clear_error():
    with pytest.raises(ValueError, match="has 5 stages.*stem, layer1"):
        backbones.get_backbone("resnet18", pretrained="none", trainable_stages=6)


def test_vit_map_is_the_patch_tokens_without_cls_and_registers():
    """A ViT with CLS and 4 register tokens: the map is its patch tokens, at any image size (padded to 14)."""
    backbone = backbones.get_backbone("vit_small_patch14_reg4_dinov2", pretrained="none").eval()
    vit = backbone.model.model
    assert vit.num_prefix_tokens == 5
    for height, width in ((56, 70), (64, 64)):
        images = torch.randn(1, 3, height, width)
        rows, columns = math.ceil(height / 14), math.ceil(width / 14)
        with torch.no_grad():
            padded = F.pad(images, (0, columns * 14 - width, 0, rows * 14 - height))
            tokens = vit.blocks(vit.norm_pre(vit._pos_embed(vit.patch_embed(padded))))
            expected = tokens[:, 5:].reshape(1, rows, columns, -1).permute(0, 3, 1, 2)
            feature_map = backbone(images)
        assert feature_map.shape == (1, 384, rows, columns)
        torch.testing.assert_close(feature_map, expected)


def test_gem_matches_its_formula():
    torch.manual_seed(0)
    gem = aggregators.get_aggregator("gem", 8, 4)
    with torch.no_grad():
        gem[1].p.fill_(2.5)
    x = torch.randn(3, 8, 5, 6, dtype=torch.float64)
    gem = gem.double()
    normalised = x / x.norm(dim=1, keepdim=True)
    pooled = normalised.clamp(min=1e-6).pow(2.5).mean(dim=(2, 3)).pow(1 / 2.5)
    projected = pooled @ gem[3].weight.T + gem[3].bias
    torch.testing.assert_close(gem(x), projected / projected.norm(dim=1, keepdim=True))


def test_mixvpr_matches_its_formula_and_resizes_the_map():
    torch.manual_seed(0)
    mixvpr = aggregators.get_aggregator("mixvpr", 6, 8, depth=2, out_rows=2, map_size=3).double()
    x = torch.randn(2, 6, 3, 3, dtype=torch.float64)
    flat = x.reshape(2, 6, 9)
    for block in mixvpr.mix:
        norm, fc1, _, fc2 = block.mix
        flat = flat + F.linear(torch.relu(F.linear(F.layer_norm(flat, (9,), norm.weight, norm.bias), fc1.weight,
                                                   fc1.bias)), fc2.weight, fc2.bias)
    channels = torch.einsum("bcn,dc->bdn", flat, mixvpr.channel_projection.weight) \
        + mixvpr.channel_projection.bias[None, :, None]  # [B, 4, 9]
    rows = torch.einsum("bdn,rn->bdr", channels, mixvpr.row_projection.weight) + mixvpr.row_projection.bias
    expected = rows.reshape(2, 8)
    torch.testing.assert_close(mixvpr(x), expected / expected.norm(dim=1, keepdim=True))
    big_map = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # 6x6, average-pooled back to x
    torch.testing.assert_close(mixvpr(big_map), mixvpr(x))


def test_mixvpr_and_boq_need_a_divisible_descriptor():
    with pytest.raises(ValueError, match="--fc_output_dim 30 must be a multiple of --mixvpr_out_rows 4"):
        aggregators.get_aggregator("mixvpr", 8, 30, out_rows=4)
    with pytest.raises(ValueError, match="--boq_out_rows"):
        aggregators.get_aggregator("boq", 8, 30, out_rows=4)


def test_netvlad_matches_the_residual_formula():
    """Against the original's formulation: residuals of every descriptor to every centroid, weighted by the
    softmax assignment, summed, intra-normalised, L2; then the projection and L2."""
    torch.manual_seed(0)
    netvlad = aggregators.get_aggregator("netvlad", 6, 5, clusters=3).double()
    x = torch.randn(2, 6, 4, 3, dtype=torch.float64)
    local = (x / x.norm(dim=1, keepdim=True)).flatten(2)  # [B, C, N]
    assignment = torch.softmax(torch.einsum("kc,bcn->bkn", netvlad.assignment.weight[:, :, 0, 0], local), dim=1)
    residuals = local[:, None, :, :] - netvlad.centroids[None, :, :, None]  # [B, K, C, N]
    vlad = (residuals * assignment[:, :, None, :]).sum(dim=3)
    vlad = (vlad / vlad.norm(dim=2, keepdim=True)).flatten(1)
    vlad = vlad / vlad.norm(dim=1, keepdim=True)
    expected = vlad @ netvlad.projection.weight.T + netvlad.projection.bias
    torch.testing.assert_close(netvlad(x), expected / expected.norm(dim=1, keepdim=True))


def clustered_maps(clusters=4, channels=8, images=6, side=4, noise=0.05, seed=0):
    """Feature maps whose local descriptors lie around `clusters` orthogonal directions; returns the maps and
    the true cluster of each descriptor (in the order of the descriptors of NetVLAD's sampling: image, position)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(clusters, (images, side * side), generator=generator)
    descriptors = torch.eye(channels)[labels] * 3 + noise * torch.randn(images, side * side, channels,
                                                                        generator=generator)
    return descriptors.transpose(1, 2).reshape(images, channels, side, side), labels


def test_netvlad_initialisation_is_kmeans_with_alpha_from_the_distances():
    maps, labels = clustered_maps()
    netvlad = aggregators.get_aggregator("netvlad", 8, 16, clusters=4)
    before = netvlad.centroids.detach().clone()
    netvlad.initialize_from_features(iter([maps[:3], maps[3:]]))
    centroids = netvlad.centroids.detach().double()
    assert not torch.allclose(centroids.float(), before)
    descriptors = F.normalize(maps.double(), dim=1).flatten(2).transpose(1, 2).reshape(-1, 8)  # all 96 are kept
    reference = torch.from_numpy(KMeans(4, n_init=10, random_state=0).fit(descriptors.numpy()).cluster_centers_)
    rows, columns = linear_sum_assignment(torch.cdist(centroids, reference).numpy())
    torch.testing.assert_close(centroids[rows], reference[columns], atol=1e-4, rtol=0)
    normalised = centroids / centroids.norm(dim=1, keepdim=True)
    similarities = (descriptors @ normalised.T).sort(dim=1, descending=True).values
    alpha = -math.log(0.01) / (similarities[:, 0] - similarities[:, 1]).mean().item()
    torch.testing.assert_close(netvlad.assignment.weight[:, :, 0, 0].double(), alpha * normalised, rtol=1e-4, atol=1e-4)
    # each descriptor is now assigned (almost only) to the centroid of its true cluster
    assignment = torch.softmax(netvlad.assignment(F.normalize(maps, dim=1)).flatten(2), dim=1)  # [B, K, N]
    best = assignment.argmax(dim=1)
    assert assignment.max(dim=1).values.min() > 0.9
    for cluster in range(4):
        assert best[labels == cluster].unique().numel() == 1
    assert best.unique().numel() == 4


def test_netvlad_initialisation_needs_enough_descriptors():
    netvlad = aggregators.get_aggregator("netvlad", 8, 16, clusters=64)
    with pytest.raises(ValueError, match="16 local descriptors for 64 clusters"):
        netvlad.initialize_from_features([torch.randn(1, 8, 4, 4)])


def test_initialize_aggregation_keeps_batchnorm_statistics():
    model = GeoLocalizationNet("resnet18", 16, "netvlad", pretrained="none", aggregator_options={"clusters": 4})
    running_mean = model.backbone[1].running_mean.clone()
    before = model.aggregation.centroids.detach().clone()
    model.initialize_aggregation(torch.randn(4, 3, 64, 64) for _ in range(2))
    assert model.training
    torch.testing.assert_close(model.backbone[1].running_mean, running_mean)
    assert not torch.allclose(model.aggregation.centroids, before)


def test_aggregator_flags_reach_the_aggregator():
    args = parser.parse_arguments("train", ["--dataset_folder", "unused", "--pretrained", "none", "--fc_output_dim", "64",
                                        "--aggregator", "mixvpr", "--mixvpr_depth", "2", "--mixvpr_out_rows", "2",
                                        "--mixvpr_map_size", "5", "--trainable_stages", "1"])
    model = GeoLocalizationNet(**parser.model_options(args))
    assert len(model.aggregation.mix) == 2 and model.aggregation.row_projection.out_features == 2
    assert model.aggregation.row_projection.in_features == 25
    assert trainable_names(model.backbone) == {n for n, _ in model.backbone.named_parameters() if n.startswith("7.")}


def test_train_all_layers_and_trainable_stages_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        parser.parse_arguments("train", ["--dataset_folder", "unused", "--train_all_layers", "--trainable_stages", "1"])
    assert "drop --trainable_stages" in capsys.readouterr().err


def test_unknown_backbone_names_the_choices():
    with pytest.raises(ValueError, match=r"resnet18.*timm.list_models"):
        backbones.get_backbone("no_such_net", pretrained="none")


def test_timm_weights_from_a_file(tmp_path):
    reference = timm.create_model("resnet18")
    path = os.path.join(tmp_path, "resnet18.pth")
    torch.save(reference.state_dict(), path)
    backbone = backbones.get_backbone("timm/resnet18", pretrained=path)
    torch.testing.assert_close(backbone.model.conv1.weight, reference.conv1.weight)
    torch.save(timm.create_model("efficientnet_b0").state_dict(), path)
    with pytest.raises(backbones.PretrainedWeightsUnavailable, match="does not fit the timm model resnet18"):
        backbones.get_backbone("timm/resnet18", pretrained=path)
    with pytest.raises(backbones.PretrainedWeightsUnavailable, match="no such file"):
        backbones.get_backbone("timm/resnet18", pretrained=os.path.join(tmp_path, "missing.pth"))


def test_timm_imagenet_weights_offline_is_a_clear_error(monkeypatch):
    def offline(*args, **kwargs):
        if kwargs.get("pretrained"):
            raise LocalEntryNotFoundError("Cannot reach the Hub")
        raise AssertionError("only the pretrained model is created")
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(backbones.PretrainedWeightsUnavailable) as error:
        backbones.get_backbone("convnext_atto", pretrained="imagenet")
    assert "Could not get the ImageNet weights of convnext_atto" in str(error.value)
    assert "--pretrained none" in str(error.value) and "--pretrained /path/to/weights.pth" in str(error.value)


def test_timm_model_without_pretrained_weights():
    with pytest.raises(backbones.PretrainedWeightsUnavailable, match="no pretrained weights for efficientnetv2_s"):
        backbones.get_backbone("efficientnetv2_s", pretrained="imagenet")


@pytest.mark.parametrize("aggregator, loss, extra", [
    ("mixvpr", "arcface", ["--mixvpr_map_size", "4"]),
    ("netvlad", "sphereface", ["--netvlad_clusters", "8", "--aggregator_init_images", "16"]),
    ("boq", "cosface", ["--boq_queries", "8", "--backbone", "timm/resnet18", "--trainable_stages", "3"]),
])
def test_training_runs(synthetic_dataset, tmp_path, aggregator, loss, extra):
    run_folder = train_in_process(*tiny_training_args(synthetic_dataset, tmp_path, "--aggregator", aggregator,
                                                      "--loss", loss, "--fc_output_dim", "64", *extra))
    with open(os.path.join(run_folder, "metrics.jsonl")) as file:
        losses = [json.loads(line)["loss"] for line in file]
    assert losses and all(math.isfinite(value) for value in losses)
    assert os.path.isfile(os.path.join(run_folder, "test_results.json"))
    with open(os.path.join(run_folder, "info.log")) as file:
        log = file.read()
    assert "Backbone: training the last" in log
    assert ("NetVLAD: 8 centroids from k-means on 64 local descriptors" in log) == (aggregator == "netvlad")
