"""Re-ranking as the second stage of a test (eval.py, train.py's final test; validations stay kNN only): each
query's first K predictions re-ordered by local feature matching, with the recalls of both orders."""

import logging

from retrieval.recalls import compute_recalls, recalls_to_str
from reranking import matchers
from reranking.features import FeatureStore


def rerank_test(rerank, dataset, predictions, recalls, recall_values, cache_folder=None):
    """With rerank (RerankSettings), each query's first rerank.k predictions re-ranked by local feature matching
    (reranking/matchers.py), the local features cached under cache_folder when given. Returns (recalls, predictions,
    reranking) of the new order, the retrieval order's recalls logged beside them and kept in
    reranking.retrieval_recalls; with rerank None, (recalls, predictions, None) as given."""
    if rerank is None:
        return recalls, predictions, None
    if rerank.k > predictions.shape[1]:
        logging.warning(f"--rerank_k {rerank.k}: only the {predictions.shape[1]} predictions retrieved (the "
                        f"largest of --recall_values) are re-ranked")
    matcher = matchers.build_matcher(rerank.name, rerank.keypoints)
    store = FeatureStore(matcher, rerank, dataset.images_paths, dataset.dataset_name, cache_folder)
    result = matchers.rerank(matcher, rerank.name, predictions, rerank.k, store, store, dataset.database_num)
    result.retrieval_recalls = recalls
    reranked_recalls = compute_recalls(result.predictions, dataset.get_positives(), recall_values)
    logging.info(f"{dataset.label}: re-ranked by {rerank.name}@{rerank.k}: "
                 f"{recalls_to_str(reranked_recalls, recall_values)} (retrieval order: "
                 f"{recalls_to_str(recalls, recall_values)}); {result.ms_per_query:.0f} ms per query, of which "
                 f"{1000 * result.matching_seconds_per_query:.0f} matching and {result.features_computed} images' "
                 f"local features in {result.features_seconds:.1f} s (the others read from the cache)")
    return reranked_recalls, result.predictions, result
