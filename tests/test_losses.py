"""Margin heads (cosface_loss.py) against their formulas computed independently, element by element in float64;
their published default margins, monotonic target logits, finite gradients at theta = 0 and pi."""

import math

import pytest
import torch
import torch.nn.functional as F

import cosface_loss
import parser

SCALE = 30.0


def cosface(theta, m):
    return math.cos(theta) - m


def arcface(theta, m):
    # cos(theta + m) while theta + m <= pi; beyond, the ArcFace code's cos(theta) - m sin(m)
    return math.cos(theta + m) if theta + m <= math.pi else math.cos(theta) - m * math.sin(m)


def arcface_easy(theta, m):
    return math.cos(theta + m) if theta < math.pi / 2 else math.cos(theta)


def sphereface(theta, m):
    k = math.floor(m * theta / math.pi)
    return (-1) ** k * math.cos(m * theta) - 2 * k


CASES = [("cosface", {}, 0.4, cosface), ("arcface", {}, 0.5, arcface), ("arcface", {}, 1.2, arcface),
         ("arcface", {"easy_margin": True}, 0.5, arcface_easy), ("sphereface", {}, 1.35, sphereface),
         ("sphereface", {}, 4.0, sphereface)]


def inputs_at_all_angles(classes=5, dim=8, batch=64, seed=0):
    """Descriptors at angles from 0 to pi from their class weight (labels), and the head's weights."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(classes, dim, generator=generator)
    labels = torch.randint(classes, (batch,), generator=generator)
    target = F.normalize(weight[labels], dim=1)
    other = torch.randn(batch, dim, generator=generator)
    other = F.normalize(other - (other * target).sum(1, keepdim=True) * target, dim=1)  # orthogonal to target
    angles = torch.linspace(0.02, math.pi - 0.02, batch)
    descriptors = torch.cos(angles)[:, None] * target + torch.sin(angles)[:, None] * other
    return descriptors * 3, weight, labels


@pytest.mark.parametrize("name, options, margin, formula", CASES)
def test_logits_match_the_formula(name, options, margin, formula):
    descriptors, weight, labels = inputs_at_all_angles()
    head = cosface_loss.MARGIN_HEADS[name](8, 5, s=SCALE, m=margin, **options)
    with torch.no_grad():
        head.weight.copy_(weight)
    logits = head(descriptors, labels).double()
    d, w = descriptors.double(), weight.double()
    for i in range(len(d)):
        for j in range(len(w)):
            cosine = (d[i] @ w[j] / (d[i].norm() * w[j].norm())).item()
            theta = math.acos(max(-1.0, min(1.0, cosine)))
            expected = SCALE * (formula(theta, margin) if j == labels[i] else cosine)
            assert logits[i, j].item() == pytest.approx(expected, abs=2e-3), (name, i, j, theta)


@pytest.mark.parametrize("name, options, margin, formula", [c for c in CASES if "easy_margin" not in c[1]])
def test_target_logit_decreases_with_the_angle(name, options, margin, formula):
    head = cosface_loss.MARGIN_HEADS[name](8, 5, m=margin, **options)
    target = head.target_logit(torch.cos(torch.linspace(0, math.pi, 500, dtype=torch.float64)))
    assert (target.diff() <= 1e-6).all()


@pytest.mark.parametrize("name, margin", [("cosface", 0.4), ("arcface", 0.5), ("sphereface", 1.35)])
def test_default_margins_are_the_published_ones(name, margin):
    assert cosface_loss.get_margin_head(name, 8, 5).m == margin
    assert cosface_loss.get_margin_head(name, 8, 5, m=0.3 if name != "sphereface" else 2.0).m != margin
    args = parser.parse_arguments("train", argv=["--dataset_folder", "unused", "--loss", name])
    assert cosface_loss.get_margin_head(args.loss, 8, 5, args.loss_scale, args.loss_margin).m == margin


@pytest.mark.parametrize("name", list(cosface_loss.MARGIN_HEADS))
def test_margin_raises_the_loss_and_gradients_stay_finite(name):
    head = cosface_loss.get_margin_head(name, 8, 5)
    labels = torch.tensor([0, 1, 2, 3])
    weight = head.weight.detach()
    descriptors = torch.stack([weight[0], -weight[1], torch.randn(8), torch.randn(8)]).requires_grad_()
    loss = F.cross_entropy(head(descriptors, labels), labels)
    loss.backward()  # theta = 0 and theta = pi for the first two descriptors
    assert torch.isfinite(descriptors.grad).all() and torch.isfinite(head.weight.grad).all()
    no_margin = cosface_loss.get_margin_head(name, 8, 5, m=1.0 if name == "sphereface" else 0.0)
    with torch.no_grad():
        no_margin.weight.copy_(head.weight)
        assert loss > F.cross_entropy(no_margin(descriptors, labels), labels)


def test_invalid_margins_and_names():
    with pytest.raises(ValueError, match="ArcFace margin"):
        cosface_loss.get_margin_head("arcface", 8, 5, m=4.0)
    with pytest.raises(ValueError, match="SphereFace margin"):
        cosface_loss.get_margin_head("sphereface", 8, 5, m=0.5)
    with pytest.raises(ValueError, match="choose one of"):
        cosface_loss.get_margin_head("softmax", 8, 5)
