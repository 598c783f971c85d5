"""Evaluates a trained model on one or more test sets and prints recall@N.

    python eval.py --resume_model logs/default/<run>/best_model.pth --test_set_folder sf_xs/val sf_xs/test tokyo_xs/test

The architecture flags (--backbone, --aggregator and its options, --fc_output_dim) are read from the args.json
beside the checkpoint; no pretrained weights are fetched. Writes, in logs/<save_dir>/<timestamp>/: args.json,
results.json (every recall with the model's path and hash and every setting that changes a recall) and, per test
set, predictions.csv (and pictures with --num_preds_to_save N).
"""

import logging
import os

import parser
from core.errors import exit_on_user_error

if __name__ == "__main__":  # --help and flag mistakes are answered here, before the heavy imports below
    ARGS = exit_on_user_error(parser.parse_arguments, "eval", None, parser.build_parser("eval", __doc__))

import numpy as np  # noqa: E402

import commons  # noqa: E402
import test  # noqa: E402
import visualizations  # noqa: E402
from core import devices, files, logs  # noqa: E402
from datasets.image_check import make_image_check  # noqa: E402
from datasets.test_dataset import query_sets  # noqa: E402
from datasets.unlabeled_dataset import UnlabeledDataset  # noqa: E402
from evaluation import results as records  # noqa: E402
from model import network  # noqa: E402
from reranking import matchers  # noqa: E402
from reranking.stage import rerank_test  # noqa: E402
from retrieval.recalls import recalls_record  # noqa: E402
from training import checkpoints, domain_adaptation  # noqa: E402


def evaluate(args):
    """Evaluates the model of args on every --test_set_folder; returns the content of results.json."""

    #### Settings, run folder and logs
    index, rerank = parser.index_settings(args), parser.rerank_settings(args)
    settings = records.evaluation_settings(index, args.eval_amp, args.test_image_size, args.test_resize,
                                           args.positive_dist_threshold, args.adabn_folder, rerank)
    args.device = devices.resolve_device(args.device)
    inference, dataset_options = parser.inference_settings(args), parser.test_dataset_options(args)
    output_folder = logs.start_run(args.save_dir, args.logs_root, vars(args), parser.implicit_settings(args))
    commons.reuse_freed_memory()
    if rerank:  # a matcher without its weights fails now, not after the descriptors
        matchers.build_matcher(rerank.name, rerank.keypoints)

    #### Model: as initialised by train.py with the same --seed, then the weights of --resume_model
    commons.make_deterministic(args.seed)
    model = network.GeoLocalizationNet(**parser.model_options(args))
    if args.resume_model is not None:
        logging.info(f"Loading model from {args.resume_model}")
        checkpoints.load_model_weights(model, args.resume_model)
    else:
        logging.warning("No --resume_model given: evaluating the model at its initialisation")
    model = model.to(args.device)
    if args.adabn_folder:
        domain_adaptation.adapt_batchnorm(model, UnlabeledDataset(args.adabn_folder, args.test_image_size,
                                                                  args.test_resize),
                                          args.device, args.infer_batch_size, args.num_workers)

    #### Each query set of each test set: kNN, re-ranking, pictures
    results = {"test_sets": {}, "labels": {}}
    image_check = make_image_check(args.check_images, args.on_bad_image, args.num_workers, test_set=True)
    rows = []
    for folder in args.test_set_folder:
        test_sets = query_sets(folder, args.query_folders, image_check, **dataset_options)
        for test_ds, tested in test.test_query_sets(test_sets, model, inference, index, args.recall_values):
            test_set_output_folder = os.path.join(output_folder, files.label_folder(test_ds.label))
            if args.save_descriptors:  # to re-check or re-rank the results without the model
                database_num, descriptors = test_ds.database_num, tested.descriptors
                files.atomic_write(os.path.join(test_set_output_folder, "descriptors.npz"), lambda file: np.savez(
                    file, database_descriptors=descriptors[:database_num],
                    queries_descriptors=descriptors[database_num:], database_paths=np.array(test_ds.database_paths),
                    queries_paths=np.array(test_ds.queries_paths), database_utms=test_ds.database_utms,
                    queries_utms=test_ds.queries_utms, predictions=tested.predictions))
            recalls, predictions, reranked = rerank_test(rerank, test_ds, tested.predictions, tested.recalls,
                                                         args.recall_values, args.descriptors_cache)
            rows.append((test_ds.label, recalls))
            # keyed by the query folder's path, but for the usual one (queries/): the test folder, as before
            key = folder if test_ds.label == files.test_set_label(folder) else test_ds.queries_folder
            results["test_sets"][key] = recalls_record(recalls, args.recall_values, reranked)
            if reranked is not None:  # apart from the recalls: a rerun takes another time, not another result
                results.setdefault("rerank_ms_per_query", {})[key] = reranked.ms_per_query
            results["labels"][key] = test_ds.label
            visualizations.save_predictions_report(
                predictions, test_ds, test_set_output_folder, args.num_preds_to_save, args.save_only_wrong_preds,
                title=visualizations.results_title(test_ds, args.resume_model, recalls, args.recall_values),
                matches=reranked and reranked.top1_matches)

    #### The table: one row per query set, one column per recall@N
    header = f"{'test set':<30}" + "".join(f"{'R@' + str(n):>8}" for n in args.recall_values)
    table = [header, "-" * len(header)] + [f"{name:<30}" + "".join(f"{r:>8.1f}" for r in recalls)
                                           for name, recalls in rows]
    logging.info("\n" + "\n".join(table))
    results = {"model": args.resume_model and os.path.abspath(args.resume_model),
               "model_sha256": args.resume_model and files.sha256_of(args.resume_model),
               "git_commit": files.git_commit(), "settings": settings, **results}
    files.atomic_json_dump(results, os.path.join(output_folder, "results.json"))
    return results


def main(argv=None):
    """eval.py in Python: main(["--resume_model", ...]) returns the content of results.json."""
    return evaluate(parser.parse_arguments("eval", argv, parser.build_parser("eval", __doc__)))


if __name__ == "__main__":
    exit_on_user_error(evaluate, ARGS)
