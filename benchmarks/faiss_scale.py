"""The FAISS indexes of faiss_indexes.FAISS_INDEXES at a million database descriptors: build time, size, search
time per query, recall@1/5 against the exact search.

    python benchmarks/faiss_scale.py [--database 1000000 --queries 1000 --dim 512 --places 50000]

The descriptors are random but shaped like place descriptors: --places random directions, each database image one
of them plus noise, L2-normalised; a query is a database image's place plus other noise. Each index is built with
the defaults of the --faiss_* flags. Two recalls: of the search (the share of queries whose exact nearest
neighbour is among the index's first N: what the approximation loses, whatever the model) and of the place (a
database image of the query's place among the first N, as a geo-localization recall@N). Times are wall-clock on
all the CPU threads that FAISS uses (printed); run it alone.
"""

import argparse
import os
import sys
import time

import faiss
import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from retrieval import faiss_indexes  # noqa: E402


def clustered_descriptors(database, queries, dim, places, noise=0.5, seed=0):
    """(database [database, dim], queries [queries, dim]) float32, L2-normalised, around `places` random directions,
    and the place of each (database_places, queries_places)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((places, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    scale = noise / np.sqrt(dim)

    def around(place_indices):
        points = centres[place_indices]
        points += scale * rng.standard_normal(points.shape, dtype=np.float32)
        return points / np.linalg.norm(points, axis=1, keepdims=True)
    database_places, queries_places = rng.integers(0, places, database), rng.integers(0, places, queries)
    database_descriptors = np.concatenate([around(database_places[start: start + 100000])
                                           for start in range(0, database, 100000)])
    return database_descriptors, around(queries_places), database_places, queries_places


def resident_mb():
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database", type=int, default=1000000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--places", type=int, default=50000)
    parser.add_argument("--indexes", nargs="+", default=list(faiss_indexes.FAISS_INDEXES))
    args = parser.parse_args()
    start = time.time()
    database, queries, database_places, queries_places = clustered_descriptors(args.database, args.queries, args.dim,
                                                                               args.places)
    print(f"{args.database} x {args.dim} database descriptors ({database.nbytes / 2 ** 30:.2f} GB), {args.queries} "
          f"queries, made in {time.time() - start:.0f} s; FAISS {faiss.__version__} on {faiss.omp_get_max_threads()} "
          f"threads", flush=True)
    rows, exact_neighbours = [], None
    for kind in ["exact"] + [k for k in args.indexes if k != "exact"]:
        resident_before, start = resident_mb(), time.time()
        index = faiss_indexes.build_index(database, kind)
        build_s, index_mb = time.time() - start, faiss_indexes.index_megabytes(index)
        start = time.time()
        predictions = faiss_indexes.search(index, queries, 5)
        ms_per_query = (time.time() - start) * 1000 / len(queries)
        if exact_neighbours is None:
            exact_neighbours = predictions[:, :1]
        recalls = [100 * np.mean(np.any(predictions[:, :n] == exact_neighbours, axis=1)) for n in (1, 5)]
        found = (predictions >= 0) & (database_places[predictions] == queries_places[:, None])
        place_recalls = [100 * np.mean(np.any(found[:, :n], axis=1)) for n in (1, 5)]
        rows.append(f"| {kind} | {build_s:.1f} | {index_mb:.0f} | {resident_mb() - resident_before:.0f} | "
                    f"{ms_per_query:.3f} | {recalls[0]:.1f} / {recalls[1]:.1f} | "
                    f"{place_recalls[0]:.1f} / {place_recalls[1]:.1f} |")
        print(rows[-1], flush=True)
        del index
    print(f"\n| index ({args.database} x {args.dim}) | build s | size MB | memory added MB | search ms per query | "
          f"search recall@1 / @5 (%) | place recall@1 / @5 (%) |\n|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
