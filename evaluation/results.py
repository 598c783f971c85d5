"""The records of an evaluation: its recalls with every setting that changes them, as written to results.json
(eval.py) and test_results.json (train.py)."""

import os

from core import files
from retrieval import faiss_indexes
from retrieval.recalls import recalls_record


def evaluation_settings(index, amp, test_image_size, test_resize, positive_dist_threshold, adabn_folder=None,
                        rerank=None):
    """Every setting that changes a recall besides the model and the images (index: IndexSettings, rerank:
    RerankSettings or None): recorded beside each result, so that results computed differently are never mixed
    up (make_report.py shows them apart). A plain evaluation records no re-ranking key, as it always did."""
    options = index.options()
    kind = options.pop("kind")
    return {"test_image_size": test_image_size, "test_resize": test_resize, "faiss_index": kind,
            "faiss_options": faiss_indexes.options_used(kind, options),
            "adabn_folder": adabn_folder and os.path.abspath(adabn_folder), "amp": amp,
            "positive_dist_threshold": positive_dist_threshold, **(rerank.record() if rerank else {})}


def save_test_results(path, rows, model_path, settings, recall_values):
    """test_results.json of a training run: the model and evaluation settings (evaluation_settings), and of each
    query set (rows: [(dataset, recalls, reranking or None)], the usual queries/ first) its recalls (and those of the
    retrieval order before re-ranking, with the time it took). The first query set's fields are at the top, as
    before; the others (Tokyo-XS's night/) under "other_query_sets", keyed by their label."""
    def record(dataset, recalls, reranked):
        timing = {} if reranked is None else {"rerank_ms_per_query": reranked.ms_per_query}
        return {"dataset": dataset.dataset_folder, "queries": dataset.queries_folder,
                **recalls_record(recalls, recall_values, reranked), **timing}
    (first, *others) = [(dataset.label, record(dataset, recalls, reranked)) for dataset, recalls, reranked in rows]
    files.atomic_json_dump({**first[1], "model": model_path, "settings": settings,
                            **({"other_query_sets": dict(others)} if others else {})}, path)
