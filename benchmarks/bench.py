"""Speed and memory of our input pipeline, training and evaluation against the naive (upstream CosPlace) ones.

    python benchmarks/bench.py [--image_size 512 --train_image_size 128 --batch_size 32 --num_workers 2
                                --device auto --iterations 10 --out results.json]

It writes synthetic 512 px JPEGs (datasets/synthetic.py scenes) into a temporary folder, runs every case in
its own process (so that each peak memory is its own) and prints one table. The naive pipeline is upstream
CosPlace's: Pillow decodes the full 512 px image, torchvision's ToTensor(/Normalize) run per image in the
Dataset, the augmentation is a Python loop over the images of the batch on the device (its
DeviceAgnosticColorJitter at 512 px, then DeviceAgnosticRandomResizedCrop to the training size), training is
fp32 with loss.item() at every step, and queries are evaluated one at a time (batch size 1). Ours is what
train.py and test.py run: uint8 tensors decoded at reduced scale (Pillow draft mode), batched augmentation on
the device, AMP (--amp, bf16 on CUDA by default), channels_last (on by default), queries batched by size,
freed CPU memory reused (commons.reuse_freed_memory); on CUDA also with --decode_on_gpu; on the CPU also in bf16
autocast (the column ours_bf16: --amp bf16 --eval_amp bf16; core/cpu.py says whether the CPU has bf16 units). Sections:
  - input pipeline: loading + default augmentations at --image_size, no network;
  - training: full steps (ResNet-18 + GeM + CosFace, Adam) at --train_image_size, and the network alone on a
    fixed batch (the upper bound of any input pipeline);
  - evaluation: descriptors of a test set at its original 512 px size, exact kNN and recalls;
  - retrieval at scale: exact against approximate indexes on random clustered descriptors.
CPU ms per image (main process + loader workers) is steadier than images/s on a shared machine.
"""

import argparse
import itertools
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import augmentations  # noqa: E402
import commons  # noqa: E402
import cosface_loss  # noqa: E402
import parser  # noqa: E402
import test  # noqa: E402
from benchmarks.naive_pipeline import (NaiveAugmentation, NaiveTrainDataset, naive_descriptors,  # noqa: E402
                                       naive_retrieval)
from benchmarks.timing import synchronize, timed_loop  # noqa: E402
from core import cpu, devices, files  # noqa: E402
from datasets.image_loading import collate_images, images_to_device  # noqa: E402
from datasets.synthetic import generate_dataset  # noqa: E402
from datasets.test_dataset import TestDataset  # noqa: E402
from datasets.listing_cache import load_groups  # noqa: E402
from datasets.train_dataset import ClassBatchSampler, TrainDataset  # noqa: E402
from retrieval import faiss_indexes  # noqa: E402
from evaluation.descriptors import compute_descriptors, dataset_descriptors  # noqa: E402
from retrieval.recalls import compute_recalls  # noqa: E402
from model import network  # noqa: E402

TRAIN_PLACES, IMAGES_PER_PLACE, TEST_PLACES = 40, 4, 12
WARMUP_BATCHES = 2  # the first waits for the workers to start


def project_args(config, image_size):
    """The project's flags for the synthetic dataset (what train.py / eval.py would parse)."""
    argv = ["--dataset_folder", config.data, "--image_size", str(image_size), "--pretrained", "none",
            "--batch_size", str(config.batch_size), "--num_workers", str(config.num_workers), "--groups_num", "1",
            "--min_images_per_class", str(IMAGES_PER_PLACE), "--device", config.device,
            "--cache_folder", os.path.join(config.data, "cache"), "--amp", config.amp, "--eval_amp", config.amp]
    args = parser.parse_arguments("train", argv=argv)
    args.device = devices.resolve_device(args.device)
    return args


def train_loader(pipeline, args, config):
    classes = load_groups(args.train_set_folder, args.M, args.alpha, args.N, args.L, args.min_images_per_class,
                          args.cache_folder)[0]
    decode_on_gpu = pipeline == "ours_gpu_decode"
    dataset = NaiveTrainDataset(classes) if pipeline == "naive" else \
        TrainDataset(classes, args.image_size, decode_on_gpu=decode_on_gpu)
    sampler = ClassBatchSampler([len(c) for c in classes], args.batch_size, args.seed, epoch=0)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=args.num_workers,
                                       pin_memory=args.device.startswith("cuda"),
                                       prefetch_factor=2 if args.num_workers else None,
                                       collate_fn=None if pipeline == "naive" else collate_images)


def augmented_batches(pipeline, args):
    """A function: loader batch -> (augmented images on the device, targets on the device)."""
    if pipeline == "naive":
        augmentation = NaiveAugmentation(args)
        return lambda batch: (augmentation(batch[0].to(args.device)), batch[1].to(args.device))
    augmentation = augmentations.TrainAugmentation(args.augmentations,
                                                   parser.augmentation_defaults(args)).to(args.device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    return lambda batch: (augmentation(images_to_device(batch[0], args.image_size, args.device))
                          .contiguous(memory_format=memory_format), batch[1].to(args.device, non_blocking=True))


def training_step(pipeline, args, classes_num):
    """A function (images, targets) -> None doing one optimisation step, as train.py (ours) or upstream."""
    model = network.GeoLocalizationNet(**parser.model_options(args)).to(args.device).train()
    head = cosface_loss.get_margin_head(args.loss, args.fc_output_dim, classes_num, args.loss_scale).to(args.device)
    if pipeline != "naive" and args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    parameters = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.Adam(parameters, lr=args.lr)
    criterion = torch.nn.CrossEntropyLoss()
    amp = "none" if pipeline == "naive" else "bf16" if pipeline.endswith("bf16") else args.amp

    def step(images, targets):
        optimizer.zero_grad(set_to_none=True)
        with devices.autocast_context(args.device, amp):
            loss = criterion(head(model(images), targets).float(), targets)
        loss.backward()
        optimizer.step()
        if pipeline == "naive":
            loss.item()  # upstream reads the loss at every step (a wait for the device)
    return step


def case_input(pipeline, config):
    args = project_args(config, config.image_size)
    augment = augmented_batches(pipeline, args)
    return timed_loop(train_loader(pipeline, args, config), augment, config.iterations, args.device,
                      args.batch_size, WARMUP_BATCHES)


def case_train(pipeline, config):
    args = project_args(config, config.train_image_size)
    loader = train_loader(pipeline, args, config)
    augment, step = augmented_batches(pipeline, args), training_step(pipeline, args, len(loader.dataset))
    if pipeline.startswith("network"):  # a fixed batch already on the device: the network alone
        images, targets = augment(next(iter(loader)))
        return timed_loop(itertools.repeat(None), lambda _: step(images, targets), config.train_iterations,
                          args.device, args.batch_size, WARMUP_BATCHES)
    return timed_loop(loader, lambda batch: step(*augment(batch)), config.train_iterations, args.device,
                      args.batch_size, WARMUP_BATCHES)


def case_eval(pipeline, config):
    """Descriptor extraction and retrieval timed apart, then a whole evaluation (test.test for ours)."""
    args = project_args(config, config.image_size)
    args.infer_batch_size, args.decode_on_gpu = config.infer_batch_size, pipeline == "ours_gpu_decode"
    model = network.GeoLocalizationNet(**parser.model_options(args)).to(args.device)
    dataset = TestDataset(args.test_set_folder, decode_on_gpu=args.decode_on_gpu)
    positives = dataset.get_positives()
    warmup_database, warmup_queries = range(args.infer_batch_size), [len(dataset) - 1]  # a batch and a query
    if pipeline == "naive":
        naive_descriptors(model, dataset, args.device, args.infer_batch_size, args.num_workers, warmup_database,
                          warmup_queries)
        extract = lambda: naive_descriptors(model, dataset, args.device, args.infer_batch_size, args.num_workers)
        retrieve = lambda d: naive_retrieval(d[:dataset.database_num], d[dataset.database_num:], positives,
                                             args.recall_values)
    else:
        if pipeline == "ours_bf16":
            args.eval_amp = "bf16"
        elif not args.device.startswith("cuda"):
            args.eval_amp = "none"
        compute_descriptors(model, dataset, args.device, args.infer_batch_size, args.num_workers, args.eval_amp,
                            args.channels_last, indices=[*warmup_database, *warmup_queries])
        extract = lambda: dataset_descriptors(dataset, model, parser.inference_settings(args))
        retrieve = lambda d: compute_recalls(faiss_indexes.knn_search(
            d[:dataset.database_num], d[dataset.database_num:], max(args.recall_values)), positives, args.recall_values)
    synchronize(args.device)  # after a warm-up (cuDNN autotuning, first allocations) on a batch and a query
    start_time = time.perf_counter()
    descriptors = extract()
    synchronize(args.device)
    extraction_time = time.perf_counter() - start_time
    start_time = time.perf_counter()
    for _ in range(config.retrieval_repeats):
        retrieve(descriptors)
    retrieval_time = (time.perf_counter() - start_time) / config.retrieval_repeats
    start_time = time.perf_counter()
    recalls = test.test(dataset, model, parser.inference_settings(args), parser.index_settings(args),
                        args.recall_values).recalls if pipeline != "naive" else retrieve(extract())
    synchronize(args.device)
    return {"descriptors_images_per_s": len(dataset) / extraction_time,
            "retrieval_ms_per_query": retrieval_time / dataset.queries_num * 1000,
            "full_evaluation_s": time.perf_counter() - start_time, "R@1": float(recalls[0])}


def case_retrieval(config):
    """Exact against ivfpq and hnsw (faiss_indexes.build_index, default flags) on clustered random descriptors."""
    rng = np.random.default_rng(0)
    dimension, clusters = 512, max(1, config.retrieval_database // 20)
    centers = rng.normal(size=(clusters, dimension)).astype(np.float32)
    database = centers[rng.integers(0, clusters, config.retrieval_database)]
    database += 0.5 * rng.normal(size=database.shape).astype(np.float32)
    queries = database[rng.integers(0, len(database), config.retrieval_queries)]
    queries = queries + 0.3 * rng.normal(size=queries.shape).astype(np.float32)
    database /= np.linalg.norm(database, axis=1, keepdims=True)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    defaults = parser.index_settings(parser.parse_arguments("eval", argv=["--test_set_folder", "-"])).options()
    indexes, exact_top1 = {}, None
    for kind in faiss_indexes.FAISS_INDEXES:
        start_time = time.perf_counter()
        index = faiss_indexes.build_index(database, **{**defaults, "kind": kind})
        build_time = time.perf_counter() - start_time
        start_time = time.perf_counter()
        predictions = faiss_indexes.search(index, queries, 10)
        search_time = time.perf_counter() - start_time
        exact_top1 = predictions[:, 0] if exact_top1 is None else exact_top1
        indexes[kind] = {"ms_per_query": search_time / len(queries) * 1000, "build_s": build_time,
                         "index_mb": faiss_indexes.index_megabytes(index),
                         "top1_as_exact_percent": float(np.mean(predictions[:, 0] == exact_top1) * 100)}
    return {"indexes": indexes}


def run_case(config):
    """Runs one case (in this process) and prints its result as the last line of the output."""
    torch.manual_seed(0)
    section, _, pipeline = config.case.partition(":")
    if pipeline != "naive":
        commons.reuse_freed_memory()  # as train.py and eval.py
    if section == "retrieval":
        result = case_retrieval(config)
    else:
        result = {"input": case_input, "train": case_train, "eval": case_eval}[section](pipeline, config)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if config.device.startswith("cuda") or (config.device == "auto" and torch.cuda.is_available()):
        result["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    print(json.dumps(result))


#### The table

def ratio(ours, naive):
    return f"{ours / naive:.2f}" if ours is not None and naive else ""


def number(value):
    return "" if value is None else f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


LOADER_METRICS = (("images_per_s", "images/s"), ("cpu_ms_per_image", "CPU ms per image (main + workers)"))
MEMORY_METRICS = (("peak_rss_mb", "peak RSS MB, main process"), ("cuda_max_allocated_mb", "CUDA max allocated MB"))


def table(results, config, pipelines):
    """One table: a row per metric; columns ours, naive, ours/naive (and ours with --decode_on_gpu on CUDA)."""
    ours_columns = [p for p in pipelines if p != "naive"]
    header = f"{'metric':<52}" + "".join(f"{p:>17}" for p in ours_columns) + f"{'naive':>12}{'ours/naive':>12}"
    lines = [header, "-" * len(header)]

    def section(title, name, metrics):
        """The title, then a row per metric measured: ours (and variants), naive, ours/naive."""
        if not any(key.startswith(f"{name}:") for key in results):
            return
        lines.append(title)
        for key, label in metrics:
            values = {p: results.get(f"{name}:{p}", {}).get(key) for p in pipelines}
            if any(v is not None for v in values.values()):
                lines.append(f"{'  ' + label:<52}" + "".join(f"{number(values.get(p)):>17}" for p in ours_columns)
                             + f"{number(values.get('naive')):>12}{ratio(values.get('ours'), values.get('naive')):>12}")

    section(f"Input pipeline at {config.image_size} px (load + default augmentations)", "input",
            LOADER_METRICS + MEMORY_METRICS)
    section(f"Training at {config.train_image_size} px (batch {config.batch_size}, {config.num_workers} workers)",
            "train", LOADER_METRICS + MEMORY_METRICS)
    network_rates = [results.get(f"train:{p}", {}).get("images_per_s") for p in ("network", "network_bf16")]
    if network_rates[0]:
        lines.append(f"{'  network alone on a fixed batch, images/s (bound)':<52}" + "".join(
            f"{number(rate):>17}" for rate in network_rates if rate))
    section(f"Evaluation ({TEST_PLACES * 2} database + {TEST_PLACES} queries at 512 px, infer batch "
            f"{config.infer_batch_size})", "eval",
            (("descriptors_images_per_s", "descriptor extraction, images/s"),
             ("retrieval_ms_per_query", "retrieval (exact kNN + recalls), ms per query"),
             ("full_evaluation_s", "full evaluation, s"), ("R@1", "R@1 (random weights: equal is right)"))
            + MEMORY_METRICS)
    retrieval = results.get("retrieval", {}).get("indexes")
    if retrieval:
        lines.append(f"Retrieval at scale ({config.retrieval_database} database, {config.retrieval_queries} queries, "
                     f"512-D; approximate index in 'ours', exact in 'naive')")
        exact = retrieval["exact"]
        for kind in (k for k in retrieval if k != "exact"):
            for key, label in (("ms_per_query", "ms per query"), ("index_mb", "index MB"),
                               ("top1_as_exact_percent", "top-1 as exact's, %"), ("build_s", "build s")):
                lines.append(f"{'  ' + kind + ' ' + label:<52}{number(retrieval[kind][key]):>17}"
                             + " " * 17 * (len(ours_columns) - 1)
                             + f"{number(exact[key]):>12}{ratio(retrieval[kind][key], exact[key]):>12}")
    return "\n".join(lines)


def machine_description(device):
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as file:
                name = next(line.split(":", 1)[1].strip() for line in file if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    units = cpu.bf16_units()
    bf16 = "unknown" if units is None else ", ".join(units) or "none"
    return f"{name}, {os.cpu_count()} CPUs (bf16 units: {bf16}), torch {torch.__version__}, device {device}"


def main():
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--image_size", type=int, default=512, help="input pipeline and evaluation section")
    cli.add_argument("--train_image_size", type=int, default=128, help="training section")
    cli.add_argument("--batch_size", type=int, default=32)
    cli.add_argument("--infer_batch_size", type=int, default=16, help="evaluation (the project's default)")
    cli.add_argument("--num_workers", type=int, default=2)
    cli.add_argument("--device", default="auto", help="auto, cpu or cuda")
    cli.add_argument("--amp", default=None, choices=["none", "fp16", "bf16"],
                     help="our pipeline's --amp (default: bf16 on CUDA, none on the CPU, with an ours_bf16 column "
                          "beside it); naive is fp32")
    cli.add_argument("--iterations", type=int, default=10, help="timed batches of the input pipeline")
    cli.add_argument("--train_iterations", type=int, default=8, help="timed training steps")
    cli.add_argument("--retrieval_repeats", type=int, default=20, help="repeats of the (fast) retrieval timing")
    cli.add_argument("--retrieval_database", type=int, default=20000,
                     help="database size of the retrieval-at-scale section (0: skip it)")
    cli.add_argument("--retrieval_queries", type=int, default=1000)
    cli.add_argument("--sections", nargs="+", default=["input", "train", "eval", "retrieval"],
                     choices=["input", "train", "eval", "retrieval"])
    cli.add_argument("--data", default=None, help="existing benchmark data folder (default: a new temporary one)")
    cli.add_argument("--out", default=None, help="also write the results as JSON here")
    cli.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: run one case in this process
    cli.add_argument("--original", default=None, metavar="PATH",
                     help="a checkout of the original CosPlace: compare train.py with it instead, side by side on "
                          "--dataset_folder (benchmarks/side_by_side.py)")
    cli.add_argument("--original_python", default=sys.executable, help="a Python with the original's requirements")
    cli.add_argument("--dataset_folder", default=None, help="with --original: train/, val/, test/ of real images")
    cli.add_argument("--side_by_side_iterations", type=int, default=100,
                     help="with --original: training iterations of each run")
    config = cli.parse_args()
    if config.original:
        if not config.dataset_folder:
            cli.error("--original needs --dataset_folder (train/, val/ and test/ with database/ and queries/)")
        import side_by_side
        config.iterations = config.side_by_side_iterations
        config.dataset_folder = os.path.abspath(config.dataset_folder)  # each train.py runs in its own checkout
        figures = side_by_side.compare(config)
        if config.out:
            files.atomic_json_dump({"machine": machine_description("cpu"), "config": vars(config), **figures},
                                   config.out)
        return
    config.device = devices.resolve_device(config.device)
    config.amp = config.amp or ("bf16" if config.device.startswith("cuda") else "none")
    if config.case:
        return run_case(config)

    with tempfile.TemporaryDirectory(prefix="bench_") as temporary_folder:
        if config.data is None:
            config.data = os.path.join(temporary_folder, "data")
            start_time = time.perf_counter()
            generate_dataset(config.data, train_places=TRAIN_PLACES, val_places=1, test_places=TEST_PLACES,
                             images_per_train_place=IMAGES_PER_PLACE, view_size=512, seed=0)
            print(f"Synthetic 512 px JPEGs written in {time.perf_counter() - start_time:.0f} s", flush=True)
        on_cuda = config.device.startswith("cuda")
        bf16_rows = not on_cuda and config.amp == "none"  # the CPU's fp32 default beside --amp bf16
        pipelines = ["ours"] + (["ours_gpu_decode"] if on_cuda else []) + (["ours_bf16"] if bf16_rows else []) + \
            ["naive"]
        cases = [f"{section}:{p}" for section in ("input", "train", "eval") if section in config.sections
                 for p in pipelines if section != "input" or p != "ours_bf16"]  # no network in the input section
        cases += [f"train:{p}" for p in ["network"] + (["network_bf16"] if bf16_rows else [])
                  if "train" in config.sections]
        if "retrieval" in config.sections and config.retrieval_database:
            cases.append("retrieval")
        results = {}
        for case in cases:
            start_time = time.perf_counter()
            command = [sys.executable, os.path.abspath(__file__), "--case", case, "--data", config.data] + \
                [f"--{k}={v}" for k, v in vars(config).items()
                 if k not in ("case", "data", "out", "sections") and v is not None]  # None would arrive as "None"
            completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT)
            if completed.returncode != 0:
                raise SystemExit(f"benchmark case {case} failed:\n{completed.stdout[-3000:]}\n"
                                 f"{completed.stderr[-5000:]}")
            results[case] = json.loads(completed.stdout.strip().splitlines()[-1])
            print(f"  {case}: done in {time.perf_counter() - start_time:.0f} s", flush=True)
    output = table(results, config, pipelines)
    print(f"\n{machine_description(config.device)}\n{output}")
    if config.out:
        files.atomic_json_dump({"machine": machine_description(config.device), "config": vars(config),
                                  "results": results, "table": output}, config.out)


if __name__ == "__main__":
    main()
