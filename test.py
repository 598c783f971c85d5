"""Evaluation: descriptors of database and queries, exact kNN with FAISS, recall@N."""

import contextlib
from collections import defaultdict

import faiss
import numpy as np
import torch
from tqdm import tqdm

from datasets.image_loading import image_size_of, normalize


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


@torch.inference_mode()
def compute_descriptors(model, dataset, device, batch_size=16, num_workers=0, amp="none", channels_last=False,
                        indices=None, description="descriptors"):
    """Descriptors [len(dataset), D] (float32, numpy) of the items at indices (all by default)."""
    indices = list(range(len(dataset))) if indices is None else list(indices)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches_by_size(dataset, indices, batch_size),
                                         num_workers=num_workers, pin_memory=str(device).startswith("cuda"))
    model = model.eval()
    descriptors = None
    for images, batch_indices in tqdm(loader, ncols=100, desc=description, leave=False):
        images = normalize(images.to(device, non_blocking=True))
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast_context(device, amp):
            batch_descriptors = model(images).float().cpu().numpy()
        if descriptors is None:
            descriptors = np.empty((len(dataset), batch_descriptors.shape[1]), dtype=np.float32)
        descriptors[batch_indices.numpy()] = batch_descriptors
    return descriptors


def knn_search(database_descriptors, queries_descriptors, k):
    """Exact L2 kNN (on L2-normalised descriptors, the same order as cosine similarity)."""
    index = faiss.IndexFlatL2(database_descriptors.shape[1])
    index.add(np.ascontiguousarray(database_descriptors, dtype=np.float32))
    distances, predictions = index.search(np.ascontiguousarray(queries_descriptors, dtype=np.float32),
                                          min(k, len(database_descriptors)))
    return predictions


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
    """Recalls of the model on a test set; with return_details also the predictions and descriptors."""
    descriptors = compute_descriptors(model, dataset, args.device, args.infer_batch_size, args.num_workers,
                                      getattr(args, "amp", "none"), getattr(args, "channels_last", False),
                                      description=f"{dataset.dataset_name} descriptors")
    database_descriptors = descriptors[:dataset.database_num]
    queries_descriptors = descriptors[dataset.database_num:]
    predictions = knn_search(database_descriptors, queries_descriptors, max(args.recall_values))
    recalls = compute_recalls(predictions, dataset.get_positives(), args.recall_values)
    if return_details:
        return recalls, predictions, descriptors
    return recalls
