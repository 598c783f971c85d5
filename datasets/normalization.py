"""ImageNet normalisation, in a leaf module (torch only): the augmentations and the inference batching both
need it, and neither should depend on the other for it."""

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(images, out=None):
    """uint8 or [0, 1] float batch -> ImageNet-normalised float batch, on the batch's device, as
    images * scale - shift: on the CPU each pass over a batch counts. With out, written there (a slice of a
    larger batch)."""
    dtype = torch.float32 if images.dtype == torch.uint8 else images.dtype
    mean = torch.tensor(IMAGENET_MEAN, device=images.device, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device, dtype=dtype).view(1, 3, 1, 1)
    if images.dtype == torch.uint8:
        return torch.mul(images, 1 / (255 * std), out=out).sub_(mean / std)
    return torch.mul(images, 1 / std, out=out).sub_(mean / std)  # 1.5x faster than addcmul's broadcasting
