"""Training augmentations, batched on the model's device with per-image random parameters (colour jitter and
resized crops written here for speed, kornia for the others).

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


GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


def grayscale_of(images):
    gray = images[:, 0] * GRAY_WEIGHTS[0]
    return gray.add_(images[:, 1], alpha=GRAY_WEIGHTS[1]).add_(images[:, 2], alpha=GRAY_WEIGHTS[2]).unsqueeze(1)


def adjust_brightness(images, factors, out):
    return torch.mul(images, factors.view(-1, 1, 1, 1), out=out).clamp_(0, 1)


def adjust_contrast(images, factors, out):
    mean = grayscale_of(images).mean(dim=(1, 2, 3)).view(-1, 1, 1, 1)
    factors = factors.view(-1, 1, 1, 1)
    return torch.mul(images, factors, out=out).add_((1 - factors) * mean).clamp_(0, 1)


def adjust_saturation(images, factors, out):
    gray = grayscale_of(images)
    return torch.sub(images, gray, out=out).mul_(factors.view(-1, 1, 1, 1)).add_(gray).clamp_(0, 1)


def adjust_hue(images, factors, out):
    """Rotates the HSV hue by factors (in turns) without materialising HSV: hue h in [0, 6) from the largest
    channel, then channel n (R 5, G 3, B 1) = max - chroma * clamp(min(k, 4 - k), 0, 1), k = (n + h) mod 6."""
    maximum, minimum = images.amax(dim=1), images.amin(dim=1)
    chroma = maximum - minimum
    red, green, blue = images.unbind(dim=1)
    hue = torch.where(maximum == red, green - blue, torch.where(maximum == green, (blue - red).add_(chroma, alpha=2),
                                                                (red - green).add_(chroma, alpha=4)))
    hue.div_(torch.where(chroma > 0, chroma, 1)).add_(6 * factors.view(-1, 1, 1)).remainder_(6)
    for channel, n in enumerate((5, 3, 1)):
        k = (hue + n).remainder_(6)
        torch.sub(maximum, torch.minimum(k, 4 - k).clamp_(0, 1).mul_(chroma), out=out[:, channel])
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


def color_jitter(strength, args):
    """Brightness/contrast/saturation/hue from their flags, all scaled by strength (default 1)."""
    scale = 1.0 if strength is None else strength
    return ColorJitter(args.brightness * scale, args.contrast * scale, args.saturation * scale,
                       min(0.5, args.hue * scale))


class RandomResizedCrop(nn.Module):
    """torchvision's RandomResizedCrop for a batch: each image its own crop, of an area in scale (a fraction of
    the image's) and a log-uniform aspect ratio in ratio (10 tries, then the central crop, as torchvision),
    resized to size x size with bilinear sampling. All crops are sampled in one grid_sample call (one affine grid
    per image), no loop over the images; the crop boxes are drawn on the CPU, so nothing waits for the device.
    The training images arrive at --image_size, so a crop is never shrunk and needs no antialiasing; inside the
    crop the pixels are torchvision's, its outermost ring of output pixels blends in the neighbouring pixels
    instead of repeating the crop's edge."""

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

    def forward(self, images):
        height, width = images.shape[-2:]
        tops, lefts, heights, widths = self.crop_boxes(height, width, len(images)).double().unbind(dim=1)
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

    def extra_repr(self):
        return f"size={self.size}, scale={self.scale}, ratio={self.ratio}"


def random_resized_crop(strength, args):
    """Crops between (1 - strength) and all of the image area, resized back to --image_size."""
    strength = args.random_resized_crop if strength is None else strength
    return RandomResizedCrop(args.image_size, scale=(1 - strength, 1.0))


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

    @staticmethod
    def in_chunks(function, images):
        """function(images), computed on the CPU in chunks of about CPU_CHUNK_PIXELS pixels: each operation
        then runs in the cache on reused memory, instead of page-faulting a new batch-sized temporary (2-3x
        faster at 512 px). On other devices, on the whole batch."""
        if images.device.type != "cpu":
            return function(images)
        chunk_size = max(1, CPU_CHUNK_PIXELS // images[0, 0].numel())
        return torch.cat([function(chunk) for chunk in images.split(chunk_size)])

    def augment_chunk(self, images):
        if images.dtype == torch.uint8:
            images = images / 255  # to float in one pass
        return self.augmentations(images).clamp_(0, 1)

    def augment(self, images):
        """The augmented images in [0, 1], before normalisation (what the preview shows)."""
        return self.in_chunks(self.augment_chunk, images)

    def forward(self, images):
        return self.in_chunks(lambda chunk: normalize(self.augment_chunk(chunk)), images)


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
