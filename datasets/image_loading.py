"""Image decoding as cheap as the format allows: the CPU is the bottleneck of most users' trainings.

Images are returned as uint8 CHW tensors; conversion to float, augmentation and normalisation happen
batched on the model's device (see augmentations.py), so the loader workers only decode and resize.
With --decode_on_gpu the workers do not even decode: they read the JPEG files' bytes (load_encoded_image),
collate_images keeps them as a list, and images_to_device decodes the whole batch at once on the GPU
(nvJPEG through TorchCodec: torchvision's decoding is deprecated since 0.29) and resizes it there.
Every path applies the EXIF orientation (phone photos are often stored sideways with Orientation 6) and scales
16-bit images to 8 bits, so training, test sets, geolocalize.py and make_dataset.py see the same pixels.
"""

import io
import logging
import os
import stat
from collections import defaultdict
from typing import NamedTuple

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from torch.utils.data import default_collate
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from core import distributed
from core.errors import UserError
from datasets.normalization import normalize

RESIZE_MODES = ("shorter_side", "square")
SWAPPING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that turn the stored image by 90 degrees
# Modes of more than 8 bits per pixel, whose convert("RGB") clips every value above 255 to white
WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


class ImageLoadError(UserError, OSError):
    """An image file that cannot be decoded, with the file name in the message."""


# What Pillow raises for a file that is not an image it can decode (DecompressionBombError: over its pixel limit)
UNREADABLE_IMAGE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)
SKIP_HINT = "remove it, or use --on_bad_image skip to skip such files"


def unreadable_image_error(path, error):
    """The ImageLoadError of a file that Pillow failed to read with error (one of UNREADABLE_IMAGE_ERRORS): the
    one place its message is made, naming the file, the reason and what to do."""
    if isinstance(error, Image.DecompressionBombError):  # "Image size (N pixels) exceeds limit of M pixels, ..."
        return ImageLoadError(f"{path}: cannot be read as an image: it is larger than Pillow opens ({error}); "
                              f"downscale it below {Image.MAX_IMAGE_PIXELS / 1e6:.0f} megapixels, or {SKIP_HINT}")
    try:
        empty = os.path.getsize(path) == 0
    except (OSError, TypeError, ValueError):
        empty = False
    reason = "an empty file, 0 bytes" if empty else str(error)
    return ImageLoadError(f"{path}: cannot be read as an image ({reason}); {SKIP_HINT}")


def check_regular_file(path):
    """An ImageLoadError for a path that is not a regular file (a folder, a FIFO, a device...) named like an image:
    reading a FIFO would wait for a writer forever. A path that does not exist is left to the reader."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, TypeError, ValueError):
        return
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else \
            "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else \
            "not a regular file"
        reason = OSError(f"{kind}, not a regular file")  # the cause, which --on_bad_image skip's warnings show
        raise ImageLoadError(f"{path}: {kind}, not an image file; {SKIP_HINT}") from reason


def target_size(original_size, size, resize="square"):
    """(w, h) that an image of original_size (w, h) is resized to. size None keeps the original size, a (w, h)
    pair is used as is, an int gives size x size with resize='square', or with resize='shorter_side' a shorter
    side of size and the aspect ratio kept, rounded down as torchvision's Resize(int) (upstream's test resize)."""
    if size is None:
        return tuple(original_size)
    if not isinstance(size, int):
        return tuple(size)
    if resize == "square":
        return size, size
    if resize != "shorter_side":
        raise ValueError(f"resize must be one of {RESIZE_MODES}, not {resize!r}")
    width, height = original_size
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def exif_orientation(image):
    """EXIF orientation (1: upright, 2-8: flipped and/or turned) of an opened image, from what Pillow read at
    opening, without decoding the pixels. A PNG's EXIF is only known before decoding when its eXIf chunk precedes
    the pixels (Pillow's getexif would decode the whole image to look further): a PNG without one counts as upright
    here (exif_transpose still turns it when loaded, but image_size_of and the target size ignore it)."""
    if image.format == "PNG" and "exif" not in image.info and "Raw profile type exif" not in image.info:
        return 1
    return image.getexif().get(ExifTags.Base.Orientation, 1)


def to_rgb(image):
    """RGB with 8 bits per channel. 16-bit modes are scaled by 1/257 and rounded (65535 -> 255); 'I' (32-bit
    integers) and 'F' (floats) are taken on the same 16-bit scale, because that is what they hold when Pillow
    opens a 16-bit PNG as 'I' (older Pillow) or a user converts one; values outside 0..65535 are clipped."""
    if image.mode in WIDE_MODES:
        values = np.asarray(image, dtype=np.float32)
        image = Image.fromarray(np.clip(np.rint(values / 257), 0, 255).astype(np.uint8), "L")
    return image.convert("RGB")


def load_pil_image(path, size=None, resize="square"):
    """Opens an image as 8-bit RGB, upright as its EXIF orientation says. With size (see target_size), JPEGs
    are decoded at a reduced scale (Pillow draft mode), never below the target size, then resized: this is
    several times faster than decoding at full size. The target size is computed on the upright image, and
    asked of draft mode in the stored (possibly sideways) frame."""
    check_regular_file(path)
    try:
        image = Image.open(path)
        if size is not None:
            sideways = exif_orientation(image) in SWAPPING_ORIENTATIONS
            size = target_size(image.size[::-1] if sideways else image.size, size, resize)
            if image.format == "JPEG":
                image.draft("RGB", size[::-1] if sideways else size)
        ImageOps.exif_transpose(image, in_place=True)
        image = to_rgb(image)
        if size is not None and image.size != size:
            image = image.resize(size, Image.BILINEAR)
    except UNREADABLE_IMAGE_ERRORS as e:
        raise unreadable_image_error(path, e) from e
    return image


def pil_to_uint8_tensor(image):
    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()


def load_image_tensor(path, size=None, resize="square"):
    """uint8 tensor [3, H, W] of load_pil_image; size is an int (resized as resize says), (w, h) or None."""
    return pil_to_uint8_tensor(load_pil_image(path, size, resize))


def image_size_of(path):
    """(width, height) of the upright image (EXIF orientation applied), read from the file header without
    decoding the pixels (see exif_orientation for PNGs)."""
    check_regular_file(path)
    try:
        with Image.open(path) as image:
            return image.size[::-1] if exif_orientation(image) in SWAPPING_ORIENTATIONS else image.size
    except UNREADABLE_IMAGE_ERRORS as e:
        raise unreadable_image_error(path, e) from e


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


def is_upright_jpeg(data):
    """Whether the bytes are a JPEG without EXIF orientation to apply: nvJPEG ignores the orientation, so the
    others are decoded by the loader worker. Bytes whose header Pillow cannot read are left to decode_jpegs, which
    names the file."""
    if bytes(data[:3].numpy()) != JPEG_MAGIC:
        return False
    try:
        with Image.open(io.BytesIO(data.numpy())) as image:
            return exif_orientation(image) == 1
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return True


def load_encoded_image(path, size=None, resize="square"):
    """The --decode_on_gpu counterpart of load_image_tensor: the file's bytes when it is an upright JPEG, decoded
    by images_to_device; other images (PNG, turned JPEGs) are decoded here, at the requested size."""
    check_regular_file(path)
    try:
        with open(path, "rb") as file:
            data = torch.frombuffer(bytearray(file.read()), dtype=torch.uint8)
    except OSError as e:
        raise ImageLoadError(f"{path}: cannot be read ({e}); {SKIP_HINT}") from e
    if not is_upright_jpeg(data):
        return EncodedImage(load_image_tensor(path, size, resize), path)
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


def jpeg_decoder():
    """TorchCodec's decode_jpeg (the successor of torchvision's, deprecated since torchvision 0.29: same pixels,
    nvJPEG batches on CUDA), imported at the first batch of --decode_on_gpu only."""
    try:
        from torchcodec.decoders import decode_jpeg
    except (ImportError, OSError, RuntimeError) as error:  # not installed, or built for another torch
        raise UserError(f"--decode_on_gpu decodes the JPEGs with TorchCodec, which cannot be imported "
                        f"({type(error).__name__}: {' '.join(str(error).split())[:200]}): pip install the torchcodec "
                        f"release made for your torch {torch.__version__.split('+')[0]} (see "
                        f"https://github.com/meta-pytorch/torchcodec#installing-torchcodec), or leave out "
                        f"--decode_on_gpu") from None
    return decode_jpeg


def decode_jpegs(data, paths, device):
    """Decodes the JPEG bytes in one batched call on device; a file that cannot be decoded is named."""
    decode_jpeg = jpeg_decoder()
    try:
        return decode_jpeg(data, mode="RGB", device=device)
    except RuntimeError:
        for one_data, path in zip(data, paths):  # which file is it? (only after a failure)
            try:
                decode_jpeg(one_data, mode="RGB", device=device)
            except RuntimeError as e:
                raise ImageLoadError(f"{path}: cannot be decoded as a JPEG on {device} ({e}); --check_images finds "
                                     f"every such file before training (with --on_bad_image skip, leaves them "
                                     f"out)") from e
        raise


def images_to_device(images, size, device, resize="square"):
    """A batch from a loader with collate_images -> uint8 [B, 3, H, W] on device. A tensor batch is copied;
    EncodedImages are decoded on the device, then resized to target_size(size, resize) (antialiased bilinear, as
    Pillow's) when size is given; the resized images must have the same size (batches_by_size)."""
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
            positions_by_shape[tuple(image.shape[-2:])].append(i)
        for (height, width), positions in positions_by_shape.items():
            new_width, new_height = target_size((width, height), size, resize)
            if (new_height, new_width) != (height, width):
                resized = TF.resize(torch.stack([decoded[i] for i in positions]), [new_height, new_width],
                                    antialias=True)
                for i, image in zip(positions, resized):
                    decoded[i] = image
    return torch.stack(decoded)


class ImageListDataset(torch.utils.data.Dataset):
    """The images of a list of paths, items (uint8 image, index): what test.compute_descriptors reads
    (images_paths, image_size, test_resize, dataset_name). An int image_size resizes the shorter side to it
    keeping the aspect ratio (test_resize='shorter_side', upstream's --resize_test_imgs) or to a square
    ('square'); None keeps each image's size. With decode_on_gpu the items are the JPEG bytes, decoded by
    images_to_device."""

    def __init__(self, paths, image_size=None, decode_on_gpu=False, name="images", test_resize="shorter_side"):
        super().__init__()
        if test_resize not in RESIZE_MODES:  # here, not in a loader worker where it would look like a bad image
            raise ValueError(f"test_resize must be one of {RESIZE_MODES}, not {test_resize!r}")
        self.images_paths, self.image_size, self.dataset_name = list(paths), image_size, name
        self.test_resize = test_resize
        self.load_image = load_encoded_image if decode_on_gpu else load_image_tensor

    def __getitem__(self, index):
        return self.load_image(self.images_paths[index], self.image_size, self.test_resize), index

    def __len__(self):
        return len(self.images_paths)

    def output_size(self, index):
        """(w, h) of item index, from the file header unless every item has the same size."""
        if isinstance(self.image_size, int) and self.test_resize == "square":
            return self.image_size, self.image_size
        return target_size(image_size_of(self.images_paths[index]), self.image_size, self.test_resize)


#### Inference batching (test sets, AdaBN, geolocalize.py)

INFERENCE_BYTES_PER_PIXEL = 225  # ResNet-18 inference in fp32 (measured: a 4000x4000 image takes 3.6 GB)
LARGE_IMAGE_BYTES = 1 << 30


def batches_by_size(dataset, indices, batch_size):
    """Batches of indices of an ImageListDataset whose items have the same size once resized, so images of
    different sizes never force a batch size of 1 (upstream's slowest step). An image so large that its
    descriptor would need gigabytes is named in a warning that suggests --test_image_size."""
    buckets = defaultdict(list)
    for index in indices:
        buckets[dataset.output_size(index)].append(index)
    largest = max(buckets, key=lambda size: size[0] * size[1], default=None)
    if largest and largest[0] * largest[1] * INFERENCE_BYTES_PER_PIXEL > LARGE_IMAGE_BYTES:
        gigabytes = largest[0] * largest[1] * INFERENCE_BYTES_PER_PIXEL / 2 ** 30
        logging.warning(f"{dataset.images_paths[buckets[largest][0]]} is {largest[0]}x{largest[1]} px: its descriptor "
                        f"needs about {gigabytes:.1f} GB of memory (ResNet-18, fp32); --test_image_size 512 resizes "
                        f"the test images (shorter side) and makes them faster too")
    return [bucket[start: start + batch_size] for bucket in buckets.values()
            for start in range(0, len(bucket), batch_size)]


def own_generator():
    """A DataLoader's own random generator. Every iterator of a DataLoader draws its workers' base seed from its
    generator, by default the global torch one: the loaders of a validation or of DANN's target images would shift
    the random stream of the training augmentation (a run with --val_every would train other weights). Their items
    are not random, so a fixed generator changes nothing else."""
    return torch.Generator().manual_seed(0)


def normalized_batches(dataset, device, batch_size=16, num_workers=0, indices=None, description="images", world_size=1,
                       rank=0):
    """(ImageNet-normalised images on device, their indices) of the dataset's items at indices (all by
    default), batched by size (batches_by_size), with a progress bar. With DDP (world_size > 1), this process's
    share of them (distributed.shard)."""
    indices = range(len(dataset)) if indices is None else indices
    share = list(distributed.shard(indices, world_size, rank))
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches_by_size(dataset, share, batch_size),
                                         num_workers=num_workers, pin_memory=str(device).startswith("cuda"),
                                         collate_fn=collate_images, generator=own_generator())
    for images, batch_indices in tqdm(loader, ncols=100, desc=description, leave=False):
        yield normalize(images_to_device(images, dataset.image_size, device, dataset.test_resize)), batch_indices
