"""Evaluation: descriptors of database and queries (optionally cached on disk), kNN with FAISS (exact, or an
approximate index for databases of millions of images), recall@N."""

import contextlib
import hashlib
import logging
import os
import time
import warnings

import numpy as np
import torch

import commons
import faiss_indexes
import reranking
from core import files
from datasets.image_loading import ImageListDataset, normalized_batches

DESCRIPTORS_CACHE_VERSION = 1


def autocast_context(device, amp):
    if amp == "none" or not str(device).startswith("cuda"):
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.float16 if amp == "fp16" else torch.bfloat16)


FREEZE_MIN_PIXELS = 64 * 512 * 512  # 64 images of 512 px: ~1 s saved with ResNet-18, for 0.2 s of tracing


class FrozenForCpu:
    """The model as TorchScript frozen for CPU inference (BatchNorm folded into the convolutions, convolutions fused
    with their activations by oneDNN): ResNet-18 at 512 px, 54 instead of 71 ms per image on 2 cores, for 0.2 s of
    tracing. Checked against the eager model on one image of each new image size (the trace must not have kept a
    size as a constant); a model that cannot be traced, or that differs, runs eagerly."""

    def __init__(self, model, example):
        self.model = model
        try:
            with warnings.catch_warnings():  # TorchScript is deprecated in favour of torch.compile, whose CPU
                warnings.simplefilter("ignore")  # compilation takes minutes: it stays the fast path up to torch 2.14
                self.frozen = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(
                    model, example[:1], check_trace=False)))
        except Exception as error:  # noqa: BLE001 (any failure of TorchScript: eager inference is always right)
            logging.debug(f"Inference runs eagerly: the model cannot be frozen with TorchScript ({error})")
            self.frozen = None
        self.checked_shapes = set()

    def __call__(self, images):
        shape = tuple(images.shape[1:])
        if self.frozen is not None and shape not in self.checked_shapes:
            try:
                same = torch.allclose(self.frozen(images[:1]), self.model(images[:1]), rtol=1e-3, atol=1e-5)
            except Exception:  # noqa: BLE001 (a size the trace cannot take, e.g. a pooling kept at the traced size)
                same = False
            if not same:
                logging.debug(f"Inference runs eagerly: the frozen model differs at image size {shape}")
                self.frozen = None
            self.checked_shapes.add(shape)
        return (self.model if self.frozen is None else self.frozen)(images)


def inference_forward(model, device, amp, example, images_num):
    """What computes descriptors: the model itself, or on the CPU in fp32 its frozen form (FrozenForCpu) when the
    images_num images (of the size of example) are enough work to pay for the tracing."""
    pixels = example.shape[-2] * example.shape[-1] * images_num
    if str(device).startswith("cpu") and amp == "none" and pixels >= FREEZE_MIN_PIXELS:
        return FrozenForCpu(model, example)
    return model


@torch.inference_mode()
def compute_descriptors(model, dataset, device, batch_size=16, num_workers=0, amp="none", channels_last=False,
                        indices=None, description="descriptors", index_groups=None, world_size=1, rank=0):
    """Descriptors [len(dataset), D] (float32, numpy) of the items at indices (all by default). index_groups: lists
    of indices batched apart (a test set's database, then its queries), so that no image shares a batch with an image
    of another group: a query set's descriptors are then the same whatever database is evaluated with it.
    With DDP (world_size > 1) each process computes its part of every group (commons.shard) and every process gets
    all of them: N GPUs extract about N times faster, and nobody waits minutes in a collective for the main one."""
    model = model.eval()
    descriptors, computed, forward = None, [], None
    groups = [commons.shard(range(len(dataset)) if group is None else group, world_size, rank)
              for group in index_groups or [indices]]
    for group in groups:
        for images, batch_indices in normalized_batches(dataset, device, batch_size, num_workers, group, description):
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            if forward is None:
                forward = inference_forward(model, device, amp, images, sum(len(group) for group in groups))
            with autocast_context(device, amp):
                batch_descriptors = forward(images).float().cpu().numpy()
            if descriptors is None:
                descriptors = np.empty((len(dataset), batch_descriptors.shape[1]), dtype=np.float32)
            descriptors[batch_indices.numpy()] = batch_descriptors
            computed.append(batch_indices.numpy())
    if world_size > 1:
        rows = np.concatenate(computed) if computed else np.empty(0, dtype=np.int64)
        descriptors = commons.all_gather_rows(descriptors, rows, len(dataset), world_size, device)
    return descriptors


def descriptors_cache_path(cache_folder, dataset, model, flags, kind="descriptors", extension="npy"):
    """The cache file of a dataset's descriptors (or of what kind names: 'local_features' of a re-ranking matcher).
    Its name hashes all they depend on, so it is never stale: the model (architecture and every weight), the images
    (paths, sizes, modification times) and the inference flags (test image size, amp, ...)."""
    digest = hashlib.sha256(f"{DESCRIPTORS_CACHE_VERSION} {model!r} {sorted(flags.items())}".encode())
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous().view(-1)
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    for path in dataset.images_paths:
        stat = os.stat(path)
        digest.update(f"{os.path.abspath(path)} {stat.st_size} {stat.st_mtime_ns}".encode())
    return os.path.join(cache_folder, f"{kind}_{dataset.dataset_name}_{digest.hexdigest()[:24]}.{extension}")


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


def dataset_descriptors(args, dataset, model, database_descriptors=None, world_size=1, rank=0):
    """compute_descriptors of the whole dataset with the flags of args, read from / written to the cache of
    --descriptors_cache when given (written by rank 0 only). A test set's database and queries are batched apart;
    database_descriptors (of the same database, computed with another query folder) are reused: only the queries
    are computed. With DDP every process computes its part and gets the whole (compute_descriptors)."""
    flags = {"test_image_size": dataset.image_size, "test_resize": dataset.test_resize, "amp": args.eval_amp,
             "channels_last": args.channels_last, "decode_on_gpu": getattr(args, "decode_on_gpu", False)}
    cache_path = None
    if args.descriptors_cache:
        cache_path = descriptors_cache_path(args.descriptors_cache, dataset, model, flags)
        cached = read_cached_descriptors(cache_path, (len(dataset), model.fc_output_dim))
        if cached is not None:
            logging.info(f"{dataset.dataset_name}: descriptors read from the cache {cache_path}")
            return cached
    database_num = getattr(dataset, "database_num", 0)
    index_groups = [range(database_num), range(database_num, len(dataset))] if database_num else None
    if database_descriptors is not None:
        index_groups = index_groups[1:]
    descriptors = compute_descriptors(model, dataset, args.device, args.infer_batch_size, args.num_workers,
                                      flags["amp"], flags["channels_last"],
                                      description=f"{dataset.dataset_name} descriptors", index_groups=index_groups,
                                      world_size=world_size, rank=rank)
    if database_descriptors is not None:
        descriptors[:database_num] = database_descriptors
    if cache_path is not None and rank == 0:
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
            "positive_dist_threshold": args.positive_dist_threshold, **rerank_settings(args)}


def rerank_settings(args):
    """The re-ranking's settings, none without --rerank (so that plain results keep the settings they always had)."""
    if getattr(args, "rerank", "none") == "none":
        return {}
    return {"rerank": args.rerank, "rerank_k": args.rerank_k, "rerank_image_size": args.rerank_image_size,
            "rerank_keypoints": args.rerank_keypoints}


def recalls_record(recalls, recall_values, reranking=None):
    """{'R@N': ...} of a results file; after re-ranking also the retrieval order's, as 'retrieval_R@N'."""
    record = {f"R@{n}": float(r) for n, r in zip(recall_values, recalls)}
    if reranking is not None:
        record.update({f"retrieval_R@{n}": float(r) for n, r in zip(recall_values, reranking.retrieval_recalls)})
    return record


def save_test_results(path, rows, model_path, args):
    """test_results.json of a training run: the model and evaluation settings, and of each query set (rows:
    [(dataset, recalls, reranking or None)], the usual queries/ first) its recalls (and those of the retrieval order
    before re-ranking, with the time it took). The first query set's fields are at the top, as before; the others
    (Tokyo-XS's night/) under "other_query_sets", keyed by their label."""
    def record(dataset, recalls, reranking):
        timing = {} if reranking is None else {"rerank_ms_per_query": reranking.ms_per_query}
        return {"dataset": dataset.dataset_folder, "queries": dataset.queries_folder,
                **recalls_record(recalls, args.recall_values, reranking), **timing}
    (first, *others) = [(dataset.label, record(dataset, recalls, reranking)) for dataset, recalls, reranking in rows]
    files.atomic_json_dump({**first[1], "model": model_path, "settings": evaluation_settings(args),
                            **({"other_query_sets": dict(others)} if others else {})}, path)


def results_title(dataset, model_path, recalls, recall_values):
    """'sf_xs/test - logs/.../best_model.pth - R@1 52.0, R@5 66.0': the title of a summary picture (dataset.label:
    'tokyo_xs/test/night' for a second query folder)."""
    shown = [f"R@{n} {r:.1f}" for n, r in zip(recall_values, recalls)][:2]
    return f"{dataset.label} - {model_path or 'untrained model'} - {', '.join(shown)}"


def recalls_to_str(recalls, recall_values):
    return ", ".join(f"R@{n}: {r:.1f}" for n, r in zip(recall_values, recalls))


def test(args, dataset, model, return_details=False, database_descriptors=None, world_size=1, rank=0):
    """Recalls of the model on a test set; with return_details also the predictions and descriptors.
    With an approximate --faiss_index, its memory and its recall loss against the exact search are logged.
    database_descriptors: see dataset_descriptors. With DDP (world_size > 1, every process calls it) the extraction
    is shared (dataset_descriptors), then every process searches the same descriptors: the same recalls on all."""
    descriptors = dataset_descriptors(args, dataset, model, database_descriptors, world_size, rank)
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


def test_query_sets(args, datasets, model, world_size=1, rank=0):
    """[(dataset, recalls, predictions, descriptors)] of test() on each query set of one test folder (query_sets):
    the database descriptors are computed once, each row equals an evaluation of its query folder alone. With DDP
    every process calls it and extracts its share (test)."""
    rows, database_descriptors = [], None
    for dataset in datasets:
        logging.info(f"Testing on {dataset}")
        recalls, predictions, descriptors = test(args, dataset, model, True, database_descriptors, world_size, rank)
        database_descriptors = descriptors[:dataset.database_num]
        logging.info(f"{dataset.label}: {recalls_to_str(recalls, args.recall_values)}")
        rows.append((dataset, recalls, predictions, descriptors))
    return rows


class FeatureStore:
    """The local features (reranking.Matcher.features) of the images of an ImageListDataset (items: uint8 image,
    index; already resized to the size the matcher sees), each computed at most once, when first asked for; with
    cache_path, read from and added to that file (an .npz of every field's arrays concatenated, with each image's
    row counts)."""

    def __init__(self, matcher, images, cache_path=None):
        self.matcher, self.images, self.cache_path = matcher, images, cache_path
        self.features = self.read_cache() if cache_path else {}
        self.computed = 0  # features computed (not read from the cache) by this store

    def read_cache(self):
        if not os.path.exists(self.cache_path):
            return {}
        try:
            with np.load(self.cache_path) as stored:
                fields = [key for key in stored.files if key not in ("indices", "version") and
                          not key.endswith("_counts")]
                offsets = {field: np.concatenate([[0], np.cumsum(stored[f"{field}_counts"])]) for field in fields}
                arrays = {field: stored[field] for field in fields}
                return {int(index): {field: arrays[field][offsets[field][i]: offsets[field][i + 1]]
                                     for field in fields} for i, index in enumerate(stored["indices"])}
        except (OSError, ValueError, KeyError, EOFError) as error:
            logging.warning(f"The local features cache {self.cache_path} cannot be read ({error}): computing them "
                            f"again")
            return {}

    def write_cache(self):
        indices = sorted(self.features)
        fields = list(self.features[indices[0]])
        arrays = {field: np.concatenate([self.features[i][field] for i in indices]) for field in fields}
        counts = {f"{field}_counts": np.array([len(self.features[i][field]) for i in indices]) for field in fields}
        files.remove_stale_temporary_files(os.path.dirname(os.path.abspath(self.cache_path)))
        files.atomic_write(self.cache_path, lambda file: np.savez(file, indices=np.array(indices), **arrays, **counts))

    def __getitem__(self, index):
        return self.get([index])[0]

    def get(self, indices):
        """The features of the images at indices, computing (and caching) those not known yet."""
        missing = sorted({int(i) for i in indices} - set(self.features))
        for index in missing:
            image = self.images[index][0]
            self.features[index] = {**self.matcher.features(image), "image_size": np.array(image.shape[1:])}
        self.computed += len(missing)
        if missing and self.cache_path:
            self.write_cache()
        return [self.features[int(i)] for i in indices]


def feature_store(args, matcher, paths, name, cached=True):
    """A FeatureStore of the images at paths as the matcher sees them (--rerank_image_size), cached under
    --descriptors_cache (keyed by the matcher, the images and the flags) when given and cached."""
    images = ImageListDataset(paths, args.rerank_image_size, name=name)
    flags = {"rerank_image_size": args.rerank_image_size, "rerank_keypoints": args.rerank_keypoints,
             "version": reranking.FEATURES_CACHE_VERSION}
    cache_path = descriptors_cache_path(args.descriptors_cache, images, matcher, flags, f"local_features_{args.rerank}",
                                        "npz") if args.descriptors_cache and cached else None
    return FeatureStore(matcher, images, cache_path)


def rerank_test(args, dataset, predictions, recalls):
    """The final test's second stage (eval.py, train.py; validations stay kNN only): with --rerank, each query's first
    --rerank_k predictions re-ranked by local feature matching (reranking.py). Returns (recalls, predictions,
    reranking) of the new order, the retrieval order's recalls logged beside them and kept in
    reranking.retrieval_recalls; without --rerank, (recalls, predictions, None) as given."""
    if args.rerank == "none":
        return recalls, predictions, None
    if args.rerank_k > predictions.shape[1]:
        logging.warning(f"--rerank_k {args.rerank_k}: only the {predictions.shape[1]} predictions retrieved (the "
                        f"largest of --recall_values) are re-ranked")
    matcher = reranking.build_matcher(args.rerank, args.rerank_keypoints)
    store = feature_store(args, matcher, dataset.images_paths, dataset.dataset_name)
    result = reranking.rerank(matcher, args.rerank, predictions, args.rerank_k, store, store, dataset.database_num)
    result.retrieval_recalls = recalls
    reranked_recalls = compute_recalls(result.predictions, dataset.get_positives(), args.recall_values)
    logging.info(f"{dataset.label}: re-ranked by {args.rerank}@{args.rerank_k}: "
                 f"{recalls_to_str(reranked_recalls, args.recall_values)} (retrieval order: "
                 f"{recalls_to_str(recalls, args.recall_values)}); {result.ms_per_query:.0f} ms per query, of which "
                 f"{1000 * result.matching_seconds_per_query:.0f} matching and {result.features_computed} images' "
                 f"local features in {result.features_seconds:.1f} s (the others read from the cache)")
    return reranked_recalls, result.predictions, result
