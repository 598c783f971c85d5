"""Training augmentations, batched on the model's device with per-image random parameters (kornia).

`--augmentations` takes a list of `name` or `name:strength`; AUGMENTATIONS maps each name to a constructor
(strength or None, args) -> nn.Module working on float images in [0, 1]. The defaults reproduce CosPlace:
ColorJitter(0.7, 0.7, 0.7, 0.5) then RandomResizedCrop(image_size, scale=(0.5, 1)).
"""

import kornia.augmentation as K
import torch
from torch import nn

from datasets.image_loading import normalize


def color_jitter(strength, args):
    """Brightness/contrast/saturation/hue from their flags, all scaled by strength (default 1)."""
    scale = 1.0 if strength is None else strength
    return K.ColorJitter(args.brightness * scale, args.contrast * scale, args.saturation * scale,
                         min(0.5, args.hue * scale), p=1.0)


def random_resized_crop(strength, args):
    """Crops between (1 - strength) and all of the image area, resized back to --image_size."""
    strength = args.random_resized_crop if strength is None else strength
    return K.RandomResizedCrop((args.image_size, args.image_size), scale=(1 - strength, 1.0))


AUGMENTATIONS = {
    "color_jitter": color_jitter,
    "random_resized_crop": random_resized_crop,
}


def parse_augmentation(spec):
    """'name' -> (name, None); 'name:0.3' -> (name, 0.3)."""
    name, _, strength = spec.partition(":")
    if name not in AUGMENTATIONS:
        raise ValueError(f"Unknown augmentation {name}: choose among {sorted(AUGMENTATIONS)}")
    try:
        return name, (float(strength) if strength else None)
    except ValueError:
        raise ValueError(f"Augmentation {spec}: the strength after ':' must be a number") from None


class TrainAugmentation(nn.Module):
    """uint8 batch -> augmented, ImageNet-normalised float batch, on whatever device the batch is on."""

    def __init__(self, specs, args):
        super().__init__()
        self.augmentations = nn.Sequential(*[AUGMENTATIONS[name](strength, args)
                                             for name, strength in map(parse_augmentation, specs)])

    def forward(self, images):
        if images.dtype == torch.uint8:
            images = images.float().div_(255)
        return normalize(self.augmentations(images).clamp_(0, 1))
