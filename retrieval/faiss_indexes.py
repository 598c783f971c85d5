"""Nearest-neighbour search of query descriptors in a database with FAISS: FAISS_INDEXES maps --faiss_index to a
builder (database descriptors, **options) -> index; exact by default, approximate for databases of millions."""

import contextlib
import inspect
import logging
import os
import tempfile

import faiss
import numpy as np


@contextlib.contextmanager
def faiss_warnings_summarised(what):
    """FAISS's C++ code prints a warning per sub-quantizer trained on few points (64 lines for ivfpq on a small
    database): they are caught from the process's stderr and logged as one line."""
    with tempfile.TemporaryFile(mode="w+b") as captured:
        saved_stderr = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved_stderr, 2)
            os.close(saved_stderr)
            captured.seek(0)
            lines = [line for line in captured.read().decode(errors="replace").splitlines() if line.strip()]
    if lines:
        logging.warning(f"FAISS printed {len(lines)} warnings while {what}, e.g.: {lines[0].strip()}")


def exact_index(descriptors, **_):
    """Brute-force L2 search: exact, 4 bytes per dimension per image."""
    index = faiss.IndexFlatL2(descriptors.shape[1])
    index.add(descriptors)
    return index


TRAINING_POINTS_PER_CELL = 64  # k-means of the cells on at most 64 x nlist images (FAISS: 256): 4x faster at 1M


def ivfpq_index(descriptors, nlist=0, nprobe=32, pq_m=64, **_):
    """Inverted lists (nlist k-means cells, nprobe of them visited per query) of product-quantised vectors
    (pq_m bytes per image): for databases of millions of images that would not fit in memory exactly."""
    images_num, dimension = descriptors.shape
    if dimension % pq_m:
        raise ValueError(f"--faiss_pq_m {pq_m} must divide the descriptor dimension {dimension}")
    nlist = nlist or max(1, min(int(4 * np.sqrt(images_num)), images_num // 39))  # >= 39 training points per cell
    bits = int(min(8, np.log2(images_num)))  # each sub-quantizer's 2^bits centroids need as many training points
    index = faiss.IndexIVFPQ(faiss.IndexFlatL2(dimension), dimension, nlist, pq_m, bits)
    index.cp.max_points_per_centroid = TRAINING_POINTS_PER_CELL
    with faiss_warnings_summarised(f"training the approximate index on {images_num} database images"):
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


def options_used(kind, options):
    """The options (IndexSettings.options) that the builder of kind takes (its named keyword parameters): those that
    change its results, recorded beside them."""
    parameters = list(inspect.signature(FAISS_INDEXES[kind]).parameters.values())[1:]
    return {p.name: options[p.name] for p in parameters if p.kind is not inspect.Parameter.VAR_KEYWORD}


def build_index(database_descriptors, kind="exact", **options):
    """A faiss index (FAISS_INDEXES[kind]) holding the database descriptors, ready to search."""
    if kind not in FAISS_INDEXES:
        raise KeyError(f"Unknown --faiss_index {kind}: choose one of {sorted(FAISS_INDEXES)}")
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
