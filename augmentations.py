"""Training augmentations, batched on the model's device with per-image random parameters (kornia).

`--augmentations` takes a list of `name` or `name:strength`; AUGMENTATIONS maps each name to a constructor
(strength or None, args) -> nn.Module working on float images in [0, 1]. The defaults reproduce CosPlace:
ColorJitter(0.7, 0.7, 0.7, 0.5) then RandomResizedCrop(image_size, scale=(0.5, 1)). The other augmentations'
defaults follow torchvision's. Random parameters come from torch's global RNG: a fixed seed reproduces them.

Preview (a PNG grid of training images, then the same images augmented):
    python augmentations.py --dataset_folder D --out DIR --augmentations night random_perspective:0.3
"""

import math
import os

import kornia.augmentation as K
import torch
import torchvision
from torch import nn

import commons
import parser
from datasets.dataset_utils import find_images
from datasets.image_loading import load_image_tensor, normalize


def checked_strength(name, strength, default, low, high):
    """The strength of an augmentation (default when not given), or a ValueError naming the valid range."""
    strength = default if strength is None else strength
    if not low <= strength <= high:
        raise ValueError(f"Augmentation {name}:{strength}: the strength must be in [{low}, {high}]")
    return strength


def color_jitter(strength, args):
    """Brightness/contrast/saturation/hue from their flags, all scaled by strength (default 1)."""
    scale = 1.0 if strength is None else strength
    return K.ColorJitter(args.brightness * scale, args.contrast * scale, args.saturation * scale,
                         min(0.5, args.hue * scale), p=1.0)


def random_resized_crop(strength, args):
    """Crops between (1 - strength) and all of the image area, resized back to --image_size."""
    strength = args.random_resized_crop if strength is None else strength
    return K.RandomResizedCrop((args.image_size, args.image_size), scale=(1 - strength, 1.0))


def random_perspective(strength, args):
    """Half of the images seen from another viewpoint: corners moved by up to strength (default 0.5) of
    half the image side."""
    return K.RandomPerspective(checked_strength("random_perspective", strength, 0.5, 0, 1), p=0.5)


def random_erasing(strength, args):
    """Half of the images get a black rectangle of 2% to strength (default 0.33) of their area, as an
    occluding car or pedestrian."""
    return K.RandomErasing(scale=(0.02, checked_strength("random_erasing", strength, 0.33, 0.02, 1)), p=0.5)


def gaussian_blur(strength, args):
    """Gaussian blur of sigma between 0.1 and strength (default 2) pixels, as motion or focus blur."""
    max_sigma = checked_strength("gaussian_blur", strength, 2.0, 0.1, args.image_size / 8)
    return K.RandomGaussianBlur(2 * math.ceil(3 * max_sigma) + 1, sigma=(0.1, max_sigma), p=1.0)


def grayscale(strength, args):
    """Converts an image to grayscale with probability strength (default 0.2)."""
    return K.RandomGrayscale(p=checked_strength("grayscale", strength, 0.2, 0, 1))


def horizontal_flip(strength, args):
    """Mirrors an image with probability strength (default 0.5)."""
    return K.RandomHorizontalFlip(p=checked_strength("horizontal_flip", strength, 0.5, 0, 1))


class NightSimulation(nn.Module):
    """Turns day images into plausible night ones, each with its own random parameters: darkening (a gamma,
    which darkens shadows more than highlights, then a gain), a colour cast from the blue of moonlight to the
    orange of sodium street lamps, and sensor noise (the grain of high-ISO night shots). strength in [0, 1]
    scales every effect. The per-image parameters are drawn on the CPU (as kornia's) and the noise on the
    images' device, both from torch's global RNGs, so a fixed seed reproduces the same images."""

    def __init__(self, strength=1.0):
        super().__init__()
        self.strength = strength

    def forward(self, images):
        uniform = torch.rand(len(images), 4, 1, 1, 1).to(images.device, images.dtype) * self.strength
        gamma = 1 + uniform[:, 0]  # 1 (unchanged) .. 2
        gain = 1 - 0.5 * uniform[:, 1]  # 1 .. 0.5
        cast = 0.25 * (2 * uniform[:, 2] - self.strength)  # -0.25 (blue) .. 0.25 (orange)
        noise_std = 0.05 * uniform[:, 3]
        channel_gains = torch.cat([1 + cast, torch.ones_like(cast), 1 - cast], dim=1)  # R, G, B
        night = images.clamp(0, 1).pow(gamma) * gain * channel_gains
        return (night + noise_std * torch.randn_like(night)).clamp_(0, 1)

    def __repr__(self):
        return f"{type(self).__name__}(strength={self.strength})"


def night(strength, args):
    """Night simulation (see NightSimulation) of strength in [0, 1] (default 1)."""
    return NightSimulation(checked_strength("night", strength, 1.0, 0, 1))


AUGMENTATIONS = {
    "color_jitter": color_jitter,
    "random_resized_crop": random_resized_crop,
    "random_perspective": random_perspective,
    "random_erasing": random_erasing,
    "gaussian_blur": gaussian_blur,
    "grayscale": grayscale,
    "horizontal_flip": horizontal_flip,
    "night": night,
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


CPU_CHUNK_PIXELS = 2 ** 18  # one 512 px image, 16 of 128 px: see TrainAugmentation.augment


class TrainAugmentation(nn.Module):
    """uint8 batch -> augmented, ImageNet-normalised float batch, on whatever device the batch is on."""

    def __init__(self, specs, args):
        super().__init__()
        self.augmentations = nn.Sequential(*[AUGMENTATIONS[name](strength, args)
                                             for name, strength in map(parse_augmentation, specs)])

    def augment(self, images):
        """The augmented images in [0, 1], before normalisation (what the preview shows). On the CPU the batch
        goes through in chunks of about CPU_CHUNK_PIXELS pixels: each operation then runs in the cache on
        reused memory, instead of page-faulting a new batch-sized temporary (3x faster at 512 px)."""
        if images.device.type == "cpu":
            chunk_size = max(1, CPU_CHUNK_PIXELS // images[0, 0].numel())
            return torch.cat([self.augment_chunk(chunk) for chunk in images.split(chunk_size)])
        return self.augment_chunk(images)

    def augment_chunk(self, images):
        if images.dtype == torch.uint8:
            images = images.float().div_(255)
        return self.augmentations(images).clamp_(0, 1)

    def forward(self, images):
        return normalize(self.augment(images))


def main(argv=None):
    """Saves OUT/augmentations.png: a row of training images, below it the same images augmented."""
    cli = parser.build_parser(is_training=True)
    cli.description = "Preview of the training augmentations: python augmentations.py --dataset_folder D --out DIR"
    preview = cli.add_argument_group("Preview")
    preview.add_argument("--out", type=str, required=True, help="folder where augmentations.png is written")
    preview.add_argument("--num_images", type=parser.positive_int, default=8, help="training images in the grid")
    args = cli.parse_args(argv)
    parser.check_arguments(cli, args, is_training=True)
    commons.make_deterministic(args.seed)
    device = commons.resolve_device(args.device)
    paths = find_images(args.train_set_folder)
    paths = [paths[i * len(paths) // args.num_images] for i in range(min(args.num_images, len(paths)))]
    originals = torch.stack([load_image_tensor(path, args.image_size) for path in paths]).to(device)
    augmented = TrainAugmentation(args.augmentations, args).to(device).augment(originals)
    grid = torchvision.utils.make_grid(torch.cat([originals.float() / 255, augmented]).cpu(), nrow=len(paths))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "augmentations.png")
    torchvision.utils.save_image(grid, path)
    print(f"Saved {path}: top row {len(paths)} images of {args.train_set_folder}, "
          f"bottom row with {' '.join(args.augmentations)}")
    return path


if __name__ == "__main__":
    main()
