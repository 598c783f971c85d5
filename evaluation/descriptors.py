"""Descriptors of a dataset's images: the model's forward in inference (on the CPU frozen with TorchScript when it
pays), batched by image size, shared between DDP processes, and cached on disk under a name that hashes all they
depend on."""

import hashlib
import logging
import os
import warnings
import zipfile

import numpy as np
import torch

from core import distributed, files
from core.devices import autocast_context
from datasets.image_loading import normalized_batches

DESCRIPTORS_CACHE_VERSION = 2  # 2: an .npz with the descriptors' checksum


FREEZE_MIN_PIXELS = 64 * 512 * 512  # 64 images of 512 px: ~1 s saved with ResNet-18, for 0.2 s of tracing


def same_descriptors(frozen, eager, amp):
    """Whether the frozen model's descriptors are the eager model's: to float rounding in fp32; in bf16 (8-bit
    mantissa, BatchNorm folded before the rounding instead of after) to a cosine above 0.999 for each image."""
    if amp == "none":
        return torch.allclose(frozen, eager, rtol=1e-3, atol=1e-5)
    return bool((torch.nn.functional.cosine_similarity(frozen, eager) > 0.999).all())


class FrozenForCpu:
    """The model as TorchScript frozen for CPU inference (BatchNorm folded into the convolutions, convolutions fused
    with their activations by oneDNN), in fp32 or in bf16 autocast (amp): ResNet-18 at 512 px, 54 instead of 71 ms
    per image on 2 cores in fp32, for 0.2 s of tracing. Checked against the eager model on one image of each new image size (the trace must not have kept a
    size as a constant); a model that cannot be traced, or that differs, runs eagerly."""

    def __init__(self, model, example, amp="none"):
        self.model, self.amp = model, amp
        try:
            with warnings.catch_warnings():  # TorchScript is deprecated in favour of torch.compile, whose CPU
                warnings.simplefilter("ignore")  # compilation takes minutes: it stays the fast path up to torch 2.14
                with autocast_context("cpu", amp):  # the trace records bf16 casts, which freezing applies to the
                    traced = torch.jit.trace(model, example[:1], check_trace=False)  # weights once
                self.frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
        except Exception as error:  # noqa: BLE001 (any failure of TorchScript: eager inference is always right)
            logging.debug(f"Inference runs eagerly: the model cannot be frozen with TorchScript ({error})")
            self.frozen = None
        self.checked_shapes = set()

    def run_frozen(self, images):
        """The frozen model holds its precision: an autocast around it would make TorchScript cast it again."""
        with torch.autocast("cpu", enabled=False):
            return self.frozen(images)

    def __call__(self, images):
        shape = tuple(images.shape[1:])
        if self.frozen is not None and shape not in self.checked_shapes:
            try:
                with autocast_context("cpu", self.amp):
                    eager = self.model(images[:1]).float()
                same = same_descriptors(self.run_frozen(images[:1]).float(), eager, self.amp)
            except Exception:  # noqa: BLE001 (a size the trace cannot take, e.g. a pooling kept at the traced size)
                same = False
            if not same:
                logging.debug(f"Inference runs eagerly: the frozen model differs at image size {shape}")
                self.frozen = None
            self.checked_shapes.add(shape)
        return (self.model if self.frozen is None else self.run_frozen)(images)


class InferenceForward:
    """What computes descriptors: the model itself, or on the CPU in fp32 or bf16 its frozen form (FrozenForCpu),
    chosen at the first batch: frozen when images_num images of its size are enough work to pay for the tracing."""

    def __init__(self, model, device, amp, images_num):
        self.model, self.device, self.amp, self.images_num = model, device, amp, images_num
        self.forward = None

    def __call__(self, images):
        if self.forward is None:
            pixels = images.shape[-2] * images.shape[-1] * self.images_num
            frozen = str(self.device).startswith("cpu") and self.amp in ("none", "bf16") and \
                pixels >= FREEZE_MIN_PIXELS
            self.forward = FrozenForCpu(self.model, images, self.amp) if frozen else self.model
        return self.forward(images)


@torch.inference_mode()
def compute_descriptors(model, dataset, device, batch_size=16, num_workers=0, amp="none", channels_last=False,
                        indices=None, description="descriptors", index_groups=None, world_size=1, rank=0):
    """Descriptors [len(dataset), D] (float32, numpy) of the items at indices (all by default). index_groups: lists
    of indices batched apart (a test set's database, then its queries), so that no image shares a batch with an image
    of another group: a query set's descriptors are then the same whatever database is evaluated with it.
    With DDP (world_size > 1) each process computes its share of every group (normalized_batches) and every process
    gets all of them: N GPUs extract about N times faster, and nobody waits minutes in a collective for the main one."""
    groups = index_groups or [range(len(dataset)) if indices is None else indices]
    forward = InferenceForward(model.eval(), device, amp, -(-sum(map(len, groups)) // world_size))
    descriptors, computed = None, []
    for group in groups:
        for images, batch_indices in normalized_batches(dataset, device, batch_size, num_workers, group, description,
                                                        world_size, rank):
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast_context(device, amp):
                batch_descriptors = forward(images).float().cpu().numpy()
            if descriptors is None:
                descriptors = np.empty((len(dataset), batch_descriptors.shape[1]), dtype=np.float32)
            descriptors[batch_indices.numpy()] = batch_descriptors
            computed.append(batch_indices.numpy())
    if world_size > 1:
        rows = np.concatenate(computed) if computed else np.empty(0, dtype=np.int64)
        descriptors = distributed.all_gather_rows(descriptors, rows, len(dataset), world_size, device)
    return descriptors


def cache_file_path(cache_folder, dataset, model, flags, kind="descriptors", extension="npz"):
    """The cache file of a dataset's descriptors (or of what kind names: 'local_features' of a re-ranking matcher).
    Its name hashes all they depend on, so it is never stale: the model (architecture and every weight), the images
    (paths, sizes, modification times) and the inference flags (test image size, amp, ...)."""
    digest = hashlib.sha256(f"{DESCRIPTORS_CACHE_VERSION} {model!r} {sorted(flags.items())}".encode())
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous().view(-1)
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    for path in dataset.images_paths:
        stat = os.stat(path)
        digest.update(f"{os.path.abspath(path)} {stat.st_size} {stat.st_mtime_ns}".encode())
    return os.path.join(cache_folder, f"{kind}_{dataset.dataset_name}_{digest.hexdigest()[:24]}.{extension}")


def read_cached_descriptors(path, shape):
    """The descriptors cached in path (files.save_checksummed), or None when there are none; a cache file that is
    truncated, of another shape or whose bytes changed since it was written (a killed or foreign write, a damaged
    disk) is reported and recomputed, not an error."""
    if not os.path.exists(path):
        return None
    try:
        descriptors = files.load_checksummed(path)
        if descriptors.shape == shape:
            return descriptors
        problem = f"holds {descriptors.shape} descriptors, {shape} expected"
    except files.ChecksumError:
        problem = "holds other descriptors than were written (its checksum differs: a damaged file)"
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as error:
        problem = f"cannot be read ({type(error).__name__}: {error})"
    logging.warning(f"The descriptors cache {path} {problem}: computing them again")
    return None


def dataset_descriptors(dataset, model, inference, database_descriptors=None, world_size=1, rank=0):
    """compute_descriptors of the whole dataset with the InferenceSettings inference, read from / written to the
    cache folder inference.cache_folder when given (written by rank 0 only). A test set's database and queries are
    batched apart; database_descriptors (of the same database, computed with another query folder) are reused: only
    the queries are computed. With DDP every process computes its part and gets the whole (compute_descriptors)."""
    flags = {"test_image_size": dataset.image_size, "test_resize": dataset.test_resize, "amp": inference.amp,
             "channels_last": inference.channels_last, "decode_on_gpu": inference.decode_on_gpu}
    cache_path = None
    if inference.cache_folder:
        cache_path = cache_file_path(inference.cache_folder, dataset, model, flags)
        cached = read_cached_descriptors(cache_path, (len(dataset), model.fc_output_dim))
        if cached is not None:
            logging.info(f"{dataset.dataset_name}: descriptors read from the cache {cache_path}")
            return cached
    database_num = getattr(dataset, "database_num", 0)
    index_groups = [range(database_num), range(database_num, len(dataset))] if database_num else None
    if database_descriptors is not None:
        index_groups = index_groups[1:]
    descriptors = compute_descriptors(model, dataset, inference.device, inference.batch_size, inference.num_workers,
                                      inference.amp, inference.channels_last,
                                      description=f"{dataset.dataset_name} descriptors", index_groups=index_groups,
                                      world_size=world_size, rank=rank)
    if database_descriptors is not None:
        descriptors[:database_num] = database_descriptors
    if cache_path is not None and rank == 0:  # a cache that cannot be written costs the next evaluation, not this one
        try:
            files.save_checksummed(cache_path, descriptors)
            logging.debug(f"{dataset.dataset_name}: descriptors written to the cache {cache_path}")
        except files.UnwritableError as error:
            logging.warning(f"The descriptors cache is not written ({error}): the next evaluation computes them "
                            f"again")
    return descriptors
