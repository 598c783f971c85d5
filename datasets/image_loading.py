"""Image decoding as cheap as the format allows: the CPU is the bottleneck of most users' trainings.

Images are returned as uint8 CHW tensors; conversion to float, augmentation and normalisation happen
batched on the model's device (see augmentations.py), so the loader workers only decode and resize.
With --decode_on_gpu the workers do not even decode: they read the JPEG files' bytes (load_encoded_image),
collate_images keeps them as a list, and images_to_device decodes the whole batch at once on the GPU
(nvJPEG through torchvision) and resizes it there.
"""

from collections import defaultdict
from typing import NamedTuple

import numpy as np
import torch
import torchvision
from PIL import Image, UnidentifiedImageError
from torch.utils.data import default_collate
from torchvision.transforms.v2 import functional as TF

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
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
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


def image_size_of(path):
    """(width, height) read from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ImageLoadError(f"{path}: cannot be read as an image ({e})") from e


#### --decode_on_gpu: the loader workers read the files, the main process decodes whole batches on the device

JPEG_MAGIC = b"\xff\xd8\xff"


class EncodedImage(NamedTuple):
    """What a loader worker returns with --decode_on_gpu: the bytes of a JPEG file (1-D uint8 tensor), or
    for another format the image decoded on the CPU ([3, H, W] uint8), with its path for error messages."""
    data: torch.Tensor
    path: str


class EncodedImages(NamedTuple):
    """A batch of EncodedImage, as collate_images makes it: the items' data concatenated into one uint8 tensor
    (one shared-memory block per batch, as torch's collation makes; a tensor per file would exhaust the file
    descriptors that carry them between processes), with each item's length and shape (None for JPEG bytes)."""
    data: torch.Tensor
    lengths: list
    shapes: list
    paths: list


def load_encoded_image(path, size=None):
    """The --decode_on_gpu counterpart of load_image_tensor: the file's bytes when it is a JPEG, decoded by
    images_to_device; other formats (PNG) are decoded here, at the requested size."""
    try:
        data = torchvision.io.read_file(path)
    except (OSError, RuntimeError) as e:
        raise ImageLoadError(f"{path}: cannot be read ({e})") from e
    if bytes(data[:3].numpy()) != JPEG_MAGIC:
        return EncodedImage(load_image_tensor(path, size), path)
    return EncodedImage(data, path)


def collate_images(batch):
    """DataLoader collate_fn of datasets whose items are (image, label...): torch's default collation, except
    for the EncodedImage of --decode_on_gpu, of different lengths, which become one EncodedImages."""
    if isinstance(batch[0][0], EncodedImage):
        data = [item[0].data for item in batch]
        images = EncodedImages(torch.cat([d.reshape(-1) for d in data]), [d.numel() for d in data],
                               [None if d.dim() == 1 else tuple(d.shape) for d in data],
                               [item[0].path for item in batch])
        return (images, *default_collate([item[1:] for item in batch]))
    return default_collate(batch)


def decode_jpegs(data, paths, device):
    """Decodes the JPEG bytes in one batched call on device; a file that cannot be decoded is named."""
    try:
        return torchvision.io.decode_jpeg(data, mode=torchvision.io.ImageReadMode.RGB, device=device)
    except RuntimeError:
        for one_data, path in zip(data, paths):  # which file is it? (only after a failure)
            try:
                torchvision.io.decode_jpeg(one_data, mode=torchvision.io.ImageReadMode.RGB, device=device)
            except RuntimeError as e:
                raise ImageLoadError(f"{path}: cannot be decoded as a JPEG on {device} ({e}); --check_images finds "
                                     f"every such file before training (with --on_bad_image skip, leaves them "
                                     f"out)") from e
        raise


def images_to_device(images, size, device):
    """A batch from a loader with collate_images -> uint8 [B, 3, H, W] on device. A tensor batch is copied;
    EncodedImages are decoded on the device, then resized to size x size (antialiased bilinear, as Pillow's)
    when size is given; without size the images must already have the same size (test.batches_by_size)."""
    if not isinstance(images, EncodedImages):
        return images.to(device, non_blocking=True)
    decoded = [data if shape is None else data.view(shape)
               for data, shape in zip(images.data.split(images.lengths), images.shapes)]
    jpegs = [i for i, shape in enumerate(images.shapes) if shape is None]
    for i, image in zip(jpegs, decode_jpegs([decoded[i] for i in jpegs], [images.paths[i] for i in jpegs], device)):
        decoded[i] = image
    decoded = [image.to(device, non_blocking=True) for image in decoded]
    if size is not None:  # one batched resize per original size (usually one for a whole dataset)
        positions_by_shape = defaultdict(list)
        for i, image in enumerate(decoded):
            positions_by_shape[tuple(image.shape)].append(i)
        for shape, positions in positions_by_shape.items():
            if shape[-2:] != (size, size):
                resized = TF.resize(torch.stack([decoded[i] for i in positions]), [size, size], antialias=True)
                for i, image in zip(positions, resized):
                    decoded[i] = image
    return torch.stack(decoded)


class ImageListDataset(torch.utils.data.Dataset):
    """The images of a list of paths, items (uint8 image, index): what test.compute_descriptors reads
    (images_paths, image_size, dataset_name). With decode_on_gpu the items are the JPEG bytes, decoded by
    images_to_device."""

    def __init__(self, paths, image_size=None, decode_on_gpu=False, name="images"):
        super().__init__()
        self.images_paths, self.image_size, self.dataset_name = list(paths), image_size, name
        self.load_image = load_encoded_image if decode_on_gpu else load_image_tensor

    def __getitem__(self, index):
        return self.load_image(self.images_paths[index], self.image_size), index

    def __len__(self):
        return len(self.images_paths)
