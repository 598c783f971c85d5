"""Evaluation: descriptors of database and queries (optionally cached on disk), kNN with FAISS (exact, or an
approximate index for databases of millions of images), recall@N."""

import contextlib
import hashlib
import logging
import os
import time
from collections import defaultdict

import faiss
import numpy as np
import torch
from tqdm import tqdm

import commons
from datasets.image_loading import collate_images, image_size_of, images_to_device, normalize

DESCRIPTORS_CACHE_VERSION = 1


def batches_by_size(dataset, indices, batch_size):
    """Batches of indices whose images have the same size, so images of different sizes never force a
    batch size of 1 (upstream's slowest step). With a fixed test size every image can share a batch."""
    if dataset.image_size is not None:
        sizes = {i: dataset.image_size for i in indices}
    else:
        sizes = {i: image_size_of(dataset.images_paths[i]) for i in indices}
    buckets = defaultdict(list)
    for index in indices:
        buckets[sizes[index]].append(index)
    return [bucket[start: start + batch_size] for bucket in buckets.values()
            for start in range(0, len(bucket), batch_size)]


def autocast_context(device, amp):
    if amp == "none" or not str(device).startswith("cuda"):
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.float16 if amp == "fp16" else torch.bfloat16)


def normalized_batches(dataset, device, batch_size=16, num_workers=0, indices=None, description="images"):
    """(ImageNet-normalised images on device, their indices) of the dataset's items at indices (all by
    default), batched by size (batches_by_size), with a progress bar."""
    indices = list(range(len(dataset))) if indices is None else list(indices)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches_by_size(dataset, indices, batch_size),
                                         num_workers=num_workers, pin_memory=str(device).startswith("cuda"),
                                         collate_fn=collate_images)
    for images, batch_indices in tqdm(loader, ncols=100, desc=description, leave=False):
        yield normalize(images_to_device(images, dataset.image_size, device)), batch_indices


@torch.inference_mode()
def compute_descriptors(model, dataset, device, batch_size=16, num_workers=0, amp="none", channels_last=False,
                        indices=None, description="descriptors"):
    """Descriptors [len(dataset), D] (float32, numpy) of the items at indices (all by default)."""
    model = model.eval()
    descriptors = None
    for images, batch_indices in normalized_batches(dataset, device, batch_size, num_workers, indices, description):
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast_context(device, amp):
            batch_descriptors = model(images).float().cpu().numpy()
        if descriptors is None:
            descriptors = np.empty((len(dataset), batch_descriptors.shape[1]), dtype=np.float32)
        descriptors[batch_indices.numpy()] = batch_descriptors
    return descriptors


def descriptors_cache_path(cache_folder, dataset, model, flags):
    """The cache file of a dataset's descriptors. Its name hashes all they depend on, so it is never stale:
    the model (architecture and every weight), the images (paths, sizes, modification times) and the
    inference flags (test image size, amp, ...)."""
    digest = hashlib.sha256(f"{DESCRIPTORS_CACHE_VERSION} {model!r} {sorted(flags.items())}".encode())
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous().view(-1)
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    for path in dataset.images_paths:
        stat = os.stat(path)
        digest.update(f"{os.path.abspath(path)} {stat.st_size} {stat.st_mtime_ns}".encode())
    return os.path.join(cache_folder, f"descriptors_{dataset.dataset_name}_{digest.hexdigest()[:24]}.npy")


def dataset_descriptors(args, dataset, model):
    """compute_descriptors of the whole dataset with the flags of args, read from / written to the cache of
    --descriptors_cache when given."""
    flags = {"test_image_size": dataset.image_size, "amp": getattr(args, "amp", "none"),
             "channels_last": getattr(args, "channels_last", False),
             "decode_on_gpu": getattr(args, "decode_on_gpu", False)}
    cache_path = None
    if getattr(args, "descriptors_cache", None):
        cache_path = descriptors_cache_path(args.descriptors_cache, dataset, model, flags)
        if os.path.exists(cache_path):
            logging.info(f"{dataset.dataset_name}: descriptors read from the cache {cache_path}")
            return np.load(cache_path)
    descriptors = compute_descriptors(model, dataset, args.device, args.infer_batch_size, args.num_workers,
                                      flags["amp"], flags["channels_last"],
                                      description=f"{dataset.dataset_name} descriptors")
    if cache_path is not None:
        commons.atomic_write(cache_path, lambda file: np.save(file, descriptors))
        logging.debug(f"{dataset.dataset_name}: descriptors written to the cache {cache_path}")
    return descriptors


#### Nearest-neighbour indexes: name -> builder(database descriptors, **options) -> a faiss index

def exact_index(descriptors, **_):
    """Brute-force L2 search: exact, 4 bytes per dimension per image."""
    index = faiss.IndexFlatL2(descriptors.shape[1])
    index.add(descriptors)
    return index


def ivfpq_index(descriptors, nlist=0, nprobe=32, pq_m=64, **_):
    """Inverted lists (nlist k-means cells, nprobe of them visited per query) of product-quantised vectors
    (pq_m bytes per image): for databases of millions of images that would not fit in memory exactly."""
    images_num, dimension = descriptors.shape
    if dimension % pq_m:
        raise ValueError(f"--faiss_pq_m {pq_m} must divide the descriptor dimension {dimension}")
    nlist = nlist or max(1, min(int(4 * np.sqrt(images_num)), images_num // 39))  # >= 39 training points per cell
    bits = int(min(8, np.log2(images_num)))  # each sub-quantizer's 2^bits centroids need as many training points
    index = faiss.IndexIVFPQ(faiss.IndexFlatL2(dimension), dimension, nlist, pq_m, bits)
    index.train(descriptors)
    index.add(descriptors)
    index.nprobe = min(nprobe, nlist)
    return index


def hnsw_index(descriptors, hnsw_m=32, ef_search=128, **_):
    """Hierarchical navigable small-world graph (hnsw_m links per node, ef_search candidates per query):
    fast queries without training, more memory than exact (the vectors plus the graph)."""
    index = faiss.IndexHNSWFlat(descriptors.shape[1], hnsw_m)
    index.hnsw.efSearch = ef_search
    index.add(descriptors)
    return index


FAISS_INDEXES = {"exact": exact_index, "ivfpq": ivfpq_index, "hnsw": hnsw_index}


def index_options(args):
    """The --faiss_* flags, as keyword arguments of build_index / knn_search."""
    return {"kind": args.faiss_index, "nlist": args.faiss_nlist, "nprobe": args.faiss_nprobe,
            "pq_m": args.faiss_pq_m, "hnsw_m": args.faiss_hnsw_m, "ef_search": args.faiss_ef_search}


def build_index(database_descriptors, kind="exact", **options):
    """A faiss index (FAISS_INDEXES[kind]) holding the database descriptors, ready to search."""
    if kind not in FAISS_INDEXES:
        raise ValueError(f"Unknown --faiss_index {kind}: choose one of {sorted(FAISS_INDEXES)}")
    return FAISS_INDEXES[kind](np.ascontiguousarray(database_descriptors, dtype=np.float32), **options)


def index_megabytes(index):
    return faiss.serialize_index(index).nbytes / 2 ** 20


def search(index, queries_descriptors, k):
    """Indices of the k nearest database images of each query (L2 on L2-normalised descriptors: the order of
    cosine similarity); -1 where an approximate index finds fewer than k."""
    _, predictions = index.search(np.ascontiguousarray(queries_descriptors, dtype=np.float32), min(k, index.ntotal))
    return predictions


def knn_search(database_descriptors, queries_descriptors, k, **options):
    """kNN of the queries in the database, through build_index (exact unless options say otherwise)."""
    return search(build_index(database_descriptors, **options), queries_descriptors, k)


def compute_recalls(predictions, positives_per_query, recall_values):
    """recall@N in percent: share of ALL queries with a positive among their first N predictions
    (queries with no positive at all count as misses, as upstream)."""
    recalls = np.zeros(len(recall_values))
    for query_index, query_predictions in enumerate(predictions):
        for i, n in enumerate(recall_values):
            if np.any(np.isin(query_predictions[:n], positives_per_query[query_index])):
                recalls[i:] += 1
                break
    return recalls / len(predictions) * 100


def recalls_to_str(recalls, recall_values):
    return ", ".join(f"R@{n}: {r:.1f}" for n, r in zip(recall_values, recalls))


def test(args, dataset, model, return_details=False):
    """Recalls of the model on a test set; with return_details also the predictions and descriptors.
    With an approximate --faiss_index, its memory and its recall loss against the exact search are logged."""
    descriptors = dataset_descriptors(args, dataset, model)
    database_descriptors = descriptors[:dataset.database_num]
    queries_descriptors = descriptors[dataset.database_num:]
    options, k = index_options(args), max(args.recall_values)
    index = build_index(database_descriptors, **options)
    start_time = time.perf_counter()
    predictions = search(index, queries_descriptors, k)
    search_time = time.perf_counter() - start_time
    recalls = compute_recalls(predictions, dataset.get_positives(), args.recall_values)
    if options["kind"] != "exact":
        reference = build_index(database_descriptors)
        start_time = time.perf_counter()
        exact_predictions = search(reference, queries_descriptors, k)
        exact_time = time.perf_counter() - start_time
        exact_recalls = compute_recalls(exact_predictions, dataset.get_positives(), args.recall_values)
        ms_per_query = 1000 / max(1, len(queries_descriptors))
        logging.info(f"{dataset.dataset_name}: {options['kind']} index {index_megabytes(index):.2f} MB "
                     f"(exact {database_descriptors.nbytes / 2 ** 20:.2f} MB), {search_time * ms_per_query:.3f} ms "
                     f"per query (exact {exact_time * ms_per_query:.3f}); recall loss (exact - approximate): "
                     + ", ".join(f"R@{n} {e - r:.2f}" for n, e, r in zip(args.recall_values, exact_recalls, recalls)))
    if return_details:
        return recalls, predictions, descriptors
    return recalls
