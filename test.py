"""Tests a model on a test set as CosPlace does: descriptors of the database and the queries
(evaluation/descriptors.py), kNN search with FAISS (exact, or an approximate index for databases of millions of
images), recall@N (retrieval/recalls.py)."""

import logging
import time
from dataclasses import dataclass

import numpy as np

from retrieval import faiss_indexes
from evaluation.descriptors import dataset_descriptors
from retrieval.recalls import compute_recalls, recalls_to_str


@dataclass
class TestResult:
    """What test() returns: recall@N (percent, one per recall value), the kNN predictions of each query (database
    indices, best first) and the descriptors of the dataset (database rows, then queries)."""
    __test__ = False  # a result, not a pytest test class
    recalls: np.ndarray
    predictions: np.ndarray
    descriptors: np.ndarray


def test(dataset, model, inference, index, recall_values, database_descriptors=None, world_size=1, rank=0):
    """The TestResult of the model on a test set (inference: InferenceSettings, index: IndexSettings).
    With an approximate index, its memory and its recall loss against the exact search are logged.
    database_descriptors: see dataset_descriptors. With DDP (world_size > 1, every process calls it) the extraction
    is shared (dataset_descriptors), then every process searches the same descriptors: the same recalls on all."""
    descriptors = dataset_descriptors(dataset, model, inference, database_descriptors, world_size, rank)
    database_descriptors = descriptors[:dataset.database_num]
    queries_descriptors = descriptors[dataset.database_num:]
    options, k = index.options(), max(recall_values)
    faiss_index = faiss_indexes.build_index(database_descriptors, **options)
    start_time = time.perf_counter()
    predictions = faiss_indexes.search(faiss_index, queries_descriptors, k)
    search_time = time.perf_counter() - start_time
    recalls = compute_recalls(predictions, dataset.get_positives(), recall_values)
    if index.kind != "exact":
        reference = faiss_indexes.build_index(database_descriptors)
        start_time = time.perf_counter()
        exact_predictions = faiss_indexes.search(reference, queries_descriptors, k)
        exact_time = time.perf_counter() - start_time
        exact_recalls = compute_recalls(exact_predictions, dataset.get_positives(), recall_values)
        ms_per_query = 1000 / max(1, len(queries_descriptors))
        logging.info(f"{dataset.dataset_name}: {index.kind} index {faiss_indexes.index_megabytes(faiss_index):.2f} "
                     f"MB (exact {database_descriptors.nbytes / 2 ** 20:.2f} MB), {search_time * ms_per_query:.3f} "
                     f"ms per query (exact {exact_time * ms_per_query:.3f}); recall loss (exact - approximate): "
                     + ", ".join(f"R@{n} {e - r:.2f}" for n, e, r in zip(recall_values, exact_recalls, recalls)))
    return TestResult(recalls, predictions, descriptors)


def test_query_sets(datasets, model, inference, index, recall_values, world_size=1, rank=0):
    """[(dataset, TestResult)] of test() on each query set of one test folder (query_sets): the database
    descriptors are computed once, each row equals an evaluation of its query folder alone. With DDP every process
    calls it and extracts its share (test)."""
    rows, database_descriptors = [], None
    for dataset in datasets:
        logging.info(f"Testing on {dataset}")
        result = test(dataset, model, inference, index, recall_values, database_descriptors, world_size, rank)
        database_descriptors = result.descriptors[:dataset.database_num]
        logging.info(f"{dataset.label}: {recalls_to_str(result.recalls, recall_values)}")
        rows.append((dataset, result))
    return rows
