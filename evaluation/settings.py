"""The evaluation's settings as small frozen dataclasses, built once from the flags by parser.py: what the
evaluation code takes instead of the flags' Namespace. Each says which results it changes; `record()` gives what is
written beside every result (results.json, test_results.json) so that results computed differently are never
mixed up. Imports nothing heavy: parser.py builds them before any model exists."""

import dataclasses
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class InferenceSettings:
    """How descriptors are computed. amp and channels_last change them (they key the descriptors cache); device,
    batch_size and num_workers do not."""
    device: str = "cpu"
    batch_size: int = 16
    num_workers: int = 0
    amp: str = "none"
    channels_last: bool = False
    decode_on_gpu: bool = False
    cache_folder: Optional[str] = None  # --descriptors_cache: descriptors (and local features) read and written there


@dataclass(frozen=True)
class IndexSettings:
    """The kNN index (--faiss_*): exact, or an approximate one whose options change the predictions."""
    kind: str = "exact"
    nlist: int = 0
    nprobe: int = 32
    pq_m: int = 64
    hnsw_m: int = 32
    ef_search: int = 128

    def options(self):
        """Keyword arguments of faiss_indexes.build_index / knn_search."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class RerankSettings:
    """Re-ranking of each query's first k predictions by local feature matching (--rerank NAME)."""
    name: str
    k: int = 10
    image_size: int = 384
    keypoints: int = 1024

    def record(self):
        return {"rerank": self.name, "rerank_k": self.k, "rerank_image_size": self.image_size,
                "rerank_keypoints": self.keypoints}
