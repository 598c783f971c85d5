"""Training augmentations, batched on the model's device with per-image random parameters (colour jitter and
resized crops written here for speed, kornia for the others).

`--augmentations` takes a list of `name` or `name:strength`; AUGMENTATIONS maps each name to a constructor
(strength or None, AugmentationDefaults) -> nn.Module working on float images in [0, 1]. The defaults reproduce
CosPlace: ColorJitter(0.7, 0.7, 0.7, 0.5) then RandomResizedCrop(image_size, scale=(0.5, 1)). The other augmentations'
defaults follow torchvision's. Random parameters come from torch's global RNG: a fixed seed reproduces them.

Preview (a row per augmentation of the list, then the whole chain): python preview_augmentations.py
--dataset_folder D --out DIR --augmentations night random_perspective:0.3
"""

import math
from dataclasses import dataclass

import kornia.augmentation as K
import torch
from torch import nn

from core.errors import UserError
from datasets.normalization import normalize


class AugmentationError(UserError, ValueError):
    """An augmentation name or strength that does not exist."""


@dataclass(frozen=True)
class AugmentationDefaults:
    """What the augmentations take besides their strength: the training image size and the flags of CosPlace's
    colour jitter and crop (--brightness ... --random_resized_crop), whose defaults these are."""
    image_size: int = 512
    brightness: float = 0.7
    contrast: float = 0.7
    saturation: float = 0.7
    hue: float = 0.5
    random_resized_crop: float = 0.5


def checked_strength(name, strength, default, low, high):
    """The strength of an augmentation (default when not given), or an AugmentationError naming the valid range."""
    strength = default if strength is None else strength
    if not low <= strength <= high:
        raise AugmentationError(f"augmentation {name}:{strength}: the strength must be in [{low}, {high}] (e.g. "
                                f"{name}:{default})")
    return strength


GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


def grayscale_of(images):
    gray = images[:, 0] * GRAY_WEIGHTS[0]
    return gray.add_(images[:, 1], alpha=GRAY_WEIGHTS[1]).add_(images[:, 2], alpha=GRAY_WEIGHTS[2]).unsqueeze(1)


def adjust_brightness(images, factors, out):
    return torch.mul(images, factors.view(-1, 1, 1, 1), out=out).clamp_(0, 1)


def adjust_contrast(images, factors, out):
    """Blends each image with the mean of its grayscale (the weighted mean of its channels' means)."""
    means = images.mean(dim=(2, 3))  # weighted with Python numbers: no weights tensor to copy to the device
    mean = means[:, 0] * GRAY_WEIGHTS[0] + means[:, 1] * GRAY_WEIGHTS[1] + means[:, 2] * GRAY_WEIGHTS[2]
    return torch.lerp(mean.view(-1, 1, 1, 1), images, factors.view(-1, 1, 1, 1), out=out).clamp_(0, 1)


def adjust_saturation(images, factors, out):
    """Blends each image with its grayscale."""
    return torch.lerp(grayscale_of(images), images, factors.view(-1, 1, 1, 1), out=out).clamp_(0, 1)


COMPLEMENT_HUES = (3.0, 5.0, 1.0)  # cyan, magenta, yellow (in sixths of a turn): where R, G, B are at their minimum


def adjust_hue(images, factors, out):
    """Rotates the HSV hue by factors (in turns) without materialising HSV: hue h in sixths of a turn, then
    channel c = min - chroma + chroma * clamp(d, 1, 2), d the circular distance from h to COMPLEMENT_HUES[c]
    (the piecewise-linear HSV-to-RGB map). Branch-free: float masks and lerp, distances with round instead of
    remainder, as torch.where and remainder are 5-10x slower than plain arithmetic on the CPU; out may be
    images."""
    maximum, minimum = images.amax(dim=1), images.amin(dim=1)
    chroma = maximum - minimum
    red, green, blue = images.unbind(dim=1)
    is_red = torch.eq(maximum, red, out=torch.empty_like(chroma))  # 1.0 or 0.0, the sector of the hue
    is_green = torch.eq(maximum, green, out=torch.empty_like(chroma))
    hue = torch.lerp(torch.sub(red, green).add_(chroma, alpha=4), torch.sub(blue, red).add_(chroma, alpha=2),
                     is_green)  # lerp with a weight of 0 or 1 returns an end exactly
    hue = torch.lerp(hue, torch.sub(green, blue), is_red)
    hue.div_(chroma.clamp_min(torch.finfo(chroma.dtype).tiny)).add_(6 * factors.view(-1, 1, 1))  # grey: 0 / tiny
    base, distance, turns = minimum.sub_(chroma), is_red, is_green  # the masks' memory is reused
    for channel, complement in enumerate(COMPLEMENT_HUES):
        torch.sub(hue, complement, out=distance)
        torch.mul(distance, 1 / 6, out=turns).round_()
        distance.add_(turns, alpha=-6).abs_().clamp_(1, 2)
        torch.addcmul(base, chroma, distance, out=out[:, channel])
    return out


class ColorJitter(nn.Module):
    """torchvision's ColorJitter for a batch: brightness, contrast, saturation and hue factors drawn per image,
    the four operations in a random order per call, each clamped to [0, 1]: torchvision's images to 1e-5.
    About 12 passes over the batch, mostly in place; kornia's ColorJitter makes ~100 batch-sized temporaries
    (3x slower on the CPU)."""

    def __init__(self, brightness, contrast, saturation, hue):
        super().__init__()
        self.strengths = (brightness, contrast, saturation, hue)
        ranges = [(max(0.0, 1 - brightness), 1 + brightness), (max(0.0, 1 - contrast), 1 + contrast),
                  (max(0.0, 1 - saturation), 1 + saturation), (-hue, hue)]
        operations = [adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue]
        self.operations = [(operation, factor_range) for operation, factor_range, strength
                           in zip(operations, ranges, self.strengths) if strength > 0]

    def forward(self, images):
        out, source = torch.empty_like(images), images
        for i in torch.randperm(len(self.operations)).tolist():
            operation, (low, high) = self.operations[i]
            factors = torch.empty(len(images)).uniform_(low, high).to(images.device, images.dtype)
            source = operation(source, factors, out)
        return out if self.operations else images.clone()

    def extra_repr(self):
        return "brightness={}, contrast={}, saturation={}, hue={}".format(*self.strengths)


def color_jitter(strength, defaults):
    """Brightness/contrast/saturation/hue from their flags, all scaled by strength (default 1)."""
    scale = 1.0 if strength is None else strength
    return ColorJitter(defaults.brightness * scale, defaults.contrast * scale, defaults.saturation * scale,
                       min(0.5, defaults.hue * scale))


class RandomResizedCrop(nn.Module):
    """torchvision's RandomResizedCrop for a batch: each image its own crop, of an area in scale (a fraction of
    the image's) and a log-uniform aspect ratio in ratio (10 tries, then the central crop, as torchvision),
    resized to size x size with bilinear sampling. The crop boxes are drawn on the CPU, so nothing waits for the
    device. On the CPU each crop is torchvision's resized_crop exactly (interpolate's separable kernels are 3x
    faster there than grid_sample); on other devices all crops are sampled in one grid_sample call (one affine
    grid per image, no loop over the images): the training images arrive at --image_size, so a crop is never
    shrunk and needs no antialiasing; inside the crop the pixels are torchvision's, its outermost ring of output
    pixels blends in the neighbouring pixels instead of repeating the crop's edge."""

    def __init__(self, size, scale, ratio=(3 / 4, 4 / 3), tries=10):
        super().__init__()
        self.size, self.scale, self.ratio, self.tries = size, scale, ratio, tries

    def crop_boxes(self, height, width, count):
        """[count, 4] (top, left, crop height, crop width), drawn as torchvision's get_params."""
        area = height * width * torch.empty(count, self.tries).uniform_(*self.scale)
        aspect = torch.empty(count, self.tries).uniform_(math.log(self.ratio[0]), math.log(self.ratio[1])).exp_()
        widths, heights = (area * aspect).sqrt_().round_(), (area / aspect).sqrt_().round_()
        valid = (widths > 0) & (widths <= width) & (heights > 0) & (heights <= height)
        first_valid = valid.int().argmax(dim=1, keepdim=True)
        widths, heights = widths.gather(1, first_valid)[:, 0], heights.gather(1, first_valid)[:, 0]
        aspect_of_image = width / height  # torchvision's fallback: the largest central crop within ratio
        fallback_width = width if aspect_of_image <= self.ratio[1] else round(height * self.ratio[1])
        fallback_height = height if aspect_of_image >= self.ratio[0] else round(width / self.ratio[0])
        found = valid.any(dim=1)
        heights = torch.where(found, heights, fallback_height)
        widths = torch.where(found, widths, fallback_width)
        tops = (torch.rand(count) * (height - heights + 1)).floor_()
        lefts = (torch.rand(count) * (width - widths + 1)).floor_()
        return torch.stack([tops, lefts, heights, widths], dim=1).long()

    def crop_each(self, images, boxes):
        """torchvision's resized_crop, image by image (the CPU path)."""
        crops = [image[None, :, top:top + crop_height, left:left + crop_width]
                 for image, (top, left, crop_height, crop_width) in zip(images, boxes.tolist())]
        resized = [torch.nn.functional.interpolate(crop, size=(self.size, self.size), mode="bilinear",
                                                   align_corners=False, antialias=True) for crop in crops]
        return resized[0] if len(resized) == 1 else torch.cat(resized)  # a CPU chunk is often one image

    def crop_all(self, images, boxes):
        """All crops in one grid_sample call (the path of the other devices)."""
        height, width = images.shape[-2:]
        tops, lefts, heights, widths = boxes.double().unbind(dim=1)
        # Output pixel u samples x = left + (u + 0.5) * w / size - 0.5, as interpolate(align_corners=False);
        # in grid_sample's [-1, 1] coordinates that is the affine map below
        theta = torch.zeros(len(images), 2, 3, dtype=torch.float64)
        theta[:, 0, 0], theta[:, 0, 2] = widths / width, (2 * lefts + widths) / width - 1
        theta[:, 1, 1], theta[:, 1, 2] = heights / height, (2 * tops + heights) / height - 1
        grid = torch.nn.functional.affine_grid(theta.to(images.device, images.dtype),
                                               [len(images), images.shape[1], self.size, self.size],
                                               align_corners=False)
        return torch.nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="border",
                                               align_corners=False)

    def forward(self, images):
        boxes = self.crop_boxes(*images.shape[-2:], len(images))
        return self.crop_each(images, boxes) if images.device.type == "cpu" else self.crop_all(images, boxes)

    def extra_repr(self):
        return f"size={self.size}, scale={self.scale}, ratio={self.ratio}"


def random_resized_crop(strength, defaults):
    """Crops between (1 - strength) and all of the image area, resized back to --image_size."""
    strength = defaults.random_resized_crop if strength is None else strength
    return RandomResizedCrop(defaults.image_size, scale=(1 - strength, 1.0))


def random_perspective(strength, defaults):
    """Half of the images seen from another viewpoint: corners moved by up to strength (default 0.5) of
    half the image side."""
    return K.RandomPerspective(checked_strength("random_perspective", strength, 0.5, 0, 1), p=0.5)


def random_erasing(strength, defaults):
    """Half of the images get a black rectangle of 2% to strength (default 0.33) of their area, as an
    occluding car or pedestrian."""
    return K.RandomErasing(scale=(0.02, checked_strength("random_erasing", strength, 0.33, 0.02, 1)), p=0.5)


def gaussian_blur(strength, defaults):
    """Gaussian blur of sigma between 0.1 and strength (default 2) pixels, as motion or focus blur."""
    max_sigma = checked_strength("gaussian_blur", strength, 2.0, 0.1, defaults.image_size / 8)
    return K.RandomGaussianBlur(2 * math.ceil(3 * max_sigma) + 1, sigma=(0.1, max_sigma), p=1.0)


def grayscale(strength, defaults):
    """Converts an image to grayscale with probability strength (default 0.2)."""
    return K.RandomGrayscale(p=checked_strength("grayscale", strength, 0.2, 0, 1))


def horizontal_flip(strength, defaults):
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


def night(strength, defaults):
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


def parse_augmentation(spec, flag="augmentations"):
    """'name' -> (name, None); 'name:0.3' -> (name, 0.3)."""
    name, _, strength = spec.partition(":")
    if name not in AUGMENTATIONS:
        raise AugmentationError(f"--{flag} {spec}: unknown augmentation {name}; choose among "
                                f"{', '.join(AUGMENTATIONS)}")
    try:
        return name, (float(strength) if strength else None)
    except ValueError:
        raise AugmentationError(f"--{flag} {spec}: the strength after ':' must be a number") from None


def check_augmentation_specs(specs, defaults, flag="augmentations"):
    """Builds the augmentations of --flag once, so that a wrong name or strength stops the run before it starts."""
    for spec in specs:
        name, strength = parse_augmentation(spec, flag)
        AUGMENTATIONS[name](strength, defaults)


CPU_CHUNK_PIXELS = 2 ** 18  # one 512 px image, 16 of 128 px: see TrainAugmentation.in_chunks


class TrainAugmentation(nn.Module):
    """uint8 batch -> augmented, ImageNet-normalised float batch, on whatever device the batch is on."""

    def __init__(self, specs, defaults=AugmentationDefaults()):
        super().__init__()
        self.augmentations = nn.Sequential(*[AUGMENTATIONS[name](strength, defaults)
                                             for name, strength in map(parse_augmentation, specs)])

    def augment_chunk(self, images):
        if images.dtype == torch.uint8:
            images = images / 255  # to float in one pass
        return self.augmentations(images).clamp_(0, 1)

    def in_chunks(self, images, finish):
        """finish(augment_chunk(images), out): on the CPU in chunks of about CPU_CHUNK_PIXELS pixels, each
        finished into its slice of the output: each operation then runs in the cache on reused memory, instead of
        page-faulting a new batch-sized temporary (2-3x faster at 512 px). On other devices, the whole batch."""
        if images.device.type != "cpu":
            return finish(self.augment_chunk(images), None)
        chunk_size = max(1, CPU_CHUNK_PIXELS // images[0, 0].numel())
        output = None
        for start in range(0, len(images), chunk_size):
            augmented = self.augment_chunk(images[start:start + chunk_size])
            if output is None:
                output = augmented.new_empty((len(images), *augmented.shape[1:]))
            finish(augmented, output[start:start + len(augmented)])
        return output

    def augment(self, images):
        """The augmented images in [0, 1], before normalisation (what the preview shows)."""
        return self.in_chunks(images, lambda augmented, out: augmented if out is None else out.copy_(augmented))

    def forward(self, images):
        return self.in_chunks(images, normalize)
