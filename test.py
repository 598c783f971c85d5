"""Evaluation: descriptors of database and queries (optionally cached on disk), kNN with FAISS (exact, or an
approximate index for databases of millions of images), recall@N."""

import contextlib
import hashlib
import logging
import os
import time

import numpy as np
import torch

import faiss_indexes
from core import files
from datasets.image_loading import normalized_batches

DESCRIPTORS_CACHE_VERSION = 1


def autocast_context(device, amp):
    if amp == "none" or not str(device).startswith("cuda"):
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.float16 if amp == "fp16" else torch.bfloat16)


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


def read_cached_descriptors(path, shape):
    """The descriptors cached in path, or None when there are none; a cache file that is truncated or of another
    shape (a killed or foreign write) is reported and recomputed, not an error."""
    if not os.path.exists(path):
        return None
    try:
        descriptors = np.load(path)
        if descriptors.shape == shape:
            return descriptors
        problem = f"holds {descriptors.shape} descriptors, {shape} expected"
    except (OSError, ValueError, EOFError) as error:
        problem = f"cannot be read ({error})"
    logging.warning(f"The descriptors cache {path} {problem}: computing them again")
    return None


def dataset_descriptors(args, dataset, model):
    """compute_descriptors of the whole dataset with the flags of args, read from / written to the cache of
    --descriptors_cache when given."""
    flags = {"test_image_size": dataset.image_size, "test_resize": dataset.test_resize, "amp": args.eval_amp,
             "channels_last": args.channels_last, "decode_on_gpu": getattr(args, "decode_on_gpu", False)}
    cache_path = None
    if args.descriptors_cache:
        cache_path = descriptors_cache_path(args.descriptors_cache, dataset, model, flags)
        cached = read_cached_descriptors(cache_path, (len(dataset), model.fc_output_dim))
        if cached is not None:
            logging.info(f"{dataset.dataset_name}: descriptors read from the cache {cache_path}")
            return cached
    descriptors = compute_descriptors(model, dataset, args.device, args.infer_batch_size, args.num_workers,
                                      flags["amp"], flags["channels_last"],
                                      description=f"{dataset.dataset_name} descriptors")
    if cache_path is not None:
        files.remove_stale_temporary_files(args.descriptors_cache)  # left by a run killed while writing its cache
        files.atomic_write(cache_path, lambda file: np.save(file, descriptors))
        logging.debug(f"{dataset.dataset_name}: descriptors written to the cache {cache_path}")
    return descriptors


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


def evaluation_settings(args):
    """Every setting that changes a recall besides the model and the images: recorded beside each result, so
    that results computed differently are never mixed up (make_report.py shows them apart)."""
    options = faiss_indexes.index_options(args)
    kind = options.pop("kind")
    return {"test_image_size": args.test_image_size, "test_resize": args.test_resize, "faiss_index": kind,
            "faiss_options": faiss_indexes.options_used(kind, options),
            "adabn_folder": args.adabn_folder and os.path.abspath(args.adabn_folder), "amp": args.eval_amp,
            "positive_dist_threshold": args.positive_dist_threshold}


def save_test_results(path, dataset, model_path, recalls, args):
    """test_results.json of a training run: the test set, the model, its recalls and the evaluation settings."""
    files.atomic_json_dump({"dataset": dataset.dataset_folder, "model": model_path,
                            "settings": evaluation_settings(args),
                            **{f"R@{n}": float(r) for n, r in zip(args.recall_values, recalls)}}, path)


def results_title(dataset, model_path, recalls, recall_values):
    """'sf_xs/test - logs/.../best_model.pth - R@1 52.0, R@5 66.0': the title of a summary picture."""
    shown = [f"R@{n} {r:.1f}" for n, r in zip(recall_values, recalls)][:2]
    return f"{files.test_set_label(dataset.dataset_folder)} - {model_path or 'untrained model'} - {', '.join(shown)}"


def recalls_to_str(recalls, recall_values):
    return ", ".join(f"R@{n}: {r:.1f}" for n, r in zip(recall_values, recalls))


def test(args, dataset, model, return_details=False):
    """Recalls of the model on a test set; with return_details also the predictions and descriptors.
    With an approximate --faiss_index, its memory and its recall loss against the exact search are logged."""
    descriptors = dataset_descriptors(args, dataset, model)
    database_descriptors = descriptors[:dataset.database_num]
    queries_descriptors = descriptors[dataset.database_num:]
    options, k = faiss_indexes.index_options(args), max(args.recall_values)
    index = faiss_indexes.build_index(database_descriptors, **options)
    start_time = time.perf_counter()
    predictions = faiss_indexes.search(index, queries_descriptors, k)
    search_time = time.perf_counter() - start_time
    recalls = compute_recalls(predictions, dataset.get_positives(), args.recall_values)
    if options["kind"] != "exact":
        reference = faiss_indexes.build_index(database_descriptors)
        start_time = time.perf_counter()
        exact_predictions = faiss_indexes.search(reference, queries_descriptors, k)
        exact_time = time.perf_counter() - start_time
        exact_recalls = compute_recalls(exact_predictions, dataset.get_positives(), args.recall_values)
        ms_per_query = 1000 / max(1, len(queries_descriptors))
        logging.info(f"{dataset.dataset_name}: {options['kind']} index {faiss_indexes.index_megabytes(index):.2f} MB "
                     f"(exact {database_descriptors.nbytes / 2 ** 20:.2f} MB), {search_time * ms_per_query:.3f} ms "
                     f"per query (exact {exact_time * ms_per_query:.3f}); recall loss (exact - approximate): "
                     + ", ".join(f"R@{n} {e - r:.2f}" for n, e, r in zip(args.recall_values, exact_recalls, recalls)))
    if return_details:
        return recalls, predictions, descriptors
    return recalls
