"""Image decoding as cheap as the format allows: the CPU is the bottleneck of most users' trainings.

Images are returned as uint8 CHW tensors; conversion to float, augmentation and normalisation happen
batched on the model's device (see augmentations.py), so the loader workers only decode and resize.
"""

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageLoadError(OSError):
    """An image file that cannot be decoded, with the file name in the message."""


def load_pil_image(path, size=None):
    """Opens an RGB image; with size=(w, h), JPEGs are decoded at a reduced scale (Pillow draft mode),
    never below the target size, then resized. This is several times faster than decoding at full size."""
    try:
        image = Image.open(path)
        if size is not None and image.format == "JPEG":
            image.draft("RGB", size)
        image = image.convert("RGB")
        if size is not None and image.size != tuple(size):
            image = image.resize(tuple(size), Image.BILINEAR)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageLoadError(f"{path}: cannot be read as an image ({e}); "
                             f"remove it, or use --on_bad_image skip to skip such files") from e
    return image


def pil_to_uint8_tensor(image):
    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()


def load_image_tensor(path, size=None):
    """uint8 tensor [3, H, W]; size is an int (square) or (w, h) or None (original size)."""
    if isinstance(size, int):
        size = (size, size)
    return pil_to_uint8_tensor(load_pil_image(path, size))


def normalize(images):
    """uint8 or [0, 1] float batch -> ImageNet-normalised float batch, on the batch's device."""
    if images.dtype == torch.uint8:
        images = images.float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std


def image_size_of(path):
    """(width, height) read from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ImageLoadError(f"{path}: cannot be read as an image ({e})") from e
