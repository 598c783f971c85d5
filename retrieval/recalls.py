"""recall@N: the share of queries with a positive (a database image within the distance threshold) among their
first N predictions."""

import numpy as np


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


def recalls_record(recalls, recall_values, reranked=None):
    """{'R@N': ...} of a results file; after re-ranking also the retrieval order's, as 'retrieval_R@N'."""
    record = {f"R@{n}": float(r) for n, r in zip(recall_values, recalls)}
    if reranked is not None:
        record.update({f"retrieval_R@{n}": float(r) for n, r in zip(recall_values, reranked.retrieval_recalls)})
    return record
