"""The fine-tuning study of a pretrained backbone on real images, in one command (issue: no recall dip).

    python experiments/finetune_study.py --dataset_folder ../shared/data/sf_xs_night_mini \
        --pretrained ../shared/weights/efficientnet_lite0_imagenet_timm.pth --out experiments/finetune_study

Stages, in this order (each run is skipped when a finished one with the same name and seed is already in --out,
so the command can be stopped and started again, and extended with more seeds):
1. untrained: the pretrained backbone + GeM with its random FC, evaluated (val and test) without training;
2. curves: each recipe of RECIPES trained for --curve_iterations, validated every --val_every iterations;
3. extensions: on --best_recipe, each extension of EXTENSIONS trained for --extension_iterations (bf16: training
   in bf16 autocast), and each evaluation of EVALUATIONS applied to the plain recipe's best models (AdaBN towards
   the val queries; eval_bf16: the same checkpoint evaluated in bf16).
Then make_report.py aggregates the runs that differ only by --seed into mean +- std and plots the curves.
Everything is tested at --image_size (224 px by default: about 1 s per iteration of 32 on a 2-core CPU).
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Recipes compared by their learning curves: name -> train.py flags
RECIPES = {
    "cosplace": ["--recipe", "cosplace"],
    "finetune": ["--recipe", "finetune"],
    "bn_frozen_stages": ["--freeze_bn_stats", "frozen_stages"],
    "finetune_lr1e-4": ["--recipe", "finetune", "--lr", "0.0001"],
}
# Extensions measured on the best recipe: name -> train.py flags added to it ({dataset} is --dataset_folder)
EXTENSIONS = {
    "plain": [],
    "night": ["--augmentations", "color_jitter", "random_resized_crop", "night:0.5"],
    "dann": ["--da_target_folder", "{dataset}/val/queries"],
    "mixvpr": ["--aggregator", "mixvpr", "--mixvpr_map_size", "7"],
    "netvlad": ["--aggregator", "netvlad"],
    "arcface": ["--loss", "arcface"],
    "vicreg": ["--ssl_loss", "vicreg"],
    "bf16": ["--amp", "bf16"],  # training in bf16 autocast; validated and tested in fp32 like the others
}
# Evaluations of the plain extension's best models: name -> eval.py flags ({dataset} as above)
EVALUATIONS = {
    "adabn": ["--adabn_folder", "{dataset}/val/queries"],
    "eval_bf16": ["--eval_amp", "bf16"],  # the same checkpoint as the plain run's fp32 test, in bf16
}

# Flags added to the project after the first runs of the committed study, which cannot change them: one group
# (--groups_order), square 512 px images (--test_resize: the shorter side is the side), no AMP (--eval_amp: fp32
# evaluation before and after). make_report.py would otherwise keep those runs apart from the later seeds.
FLAGS_ADDED_DURING_THE_STUDY = ["groups_order", "test_resize", "eval_amp"]


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_folder", required=True, help="SF-XS layout: train/, val/, test/")
    parser.add_argument("--pretrained", required=True, help="weights file of --backbone")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--out", default=os.path.join(REPO_ROOT, "experiments", "finetune_study"),
                        help="runs go to OUT/runs/<name>/<timestamp>, the report to OUT/report")
    parser.add_argument("--stages", nargs="+", choices=["untrained", "curves", "extensions"],
                        default=["untrained", "curves", "extensions"])
    parser.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    parser.add_argument("--extensions", nargs="+", choices=[*EXTENSIONS, *EVALUATIONS],
                        default=[*EXTENSIONS, *EVALUATIONS])
    parser.add_argument("--best_recipe", choices=list(RECIPES), default="finetune")
    parser.add_argument("--curve_seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--extension_seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--curve_iterations", type=int, default=1000)
    parser.add_argument("--extension_iterations", type=int, default=200)
    parser.add_argument("--val_every", type=int, default=100)
    parser.add_argument("--image_size", type=int, default=224, help="training and test size")
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    return parser.parse_args(argv)


def common_flags(args):
    """The flags of both train.py and eval.py."""
    return ["--dataset_folder", args.dataset_folder, "--backbone", args.backbone, "--pretrained", args.pretrained,
            "--test_image_size", str(args.image_size), "--num_workers", str(args.num_workers),
            "--device", args.device, "--logs_root", os.path.join(args.out, "runs")]


def finished_run(args, name, seed, result_file):
    """The run folder of a finished run called name with this seed, or None."""
    for args_path in sorted(glob.glob(os.path.join(args.out, "runs", name, "*", "args.json"))):
        with open(args_path) as file:
            if json.load(file).get("seed") == seed and \
                    os.path.exists(os.path.join(os.path.dirname(args_path), result_file)):
                return os.path.dirname(args_path)
    return None


def run(args, script, name, seed, flags, result_file):
    """Runs script (train.py or eval.py) as run `name` with this seed unless it has already finished."""
    if finished_run(args, name, seed, result_file):
        print(f"[study] {name} seed {seed}: done already", flush=True)
        return
    command = [sys.executable, os.path.join(REPO_ROOT, script), *common_flags(args), *flags,
               "--seed", str(seed), "--save_dir", name]
    print(f"[study] {name} seed {seed}: {' '.join(command)}", flush=True)
    if args.dry_run:
        return
    start_time = time.time()
    result = subprocess.run(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if result.returncode:
        sys.exit(f"[study] {name} seed {seed} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    print(f"[study] {name} seed {seed}: finished in {time.time() - start_time:.0f} s", flush=True)


def training_flags(args, recipe, iterations, extra=()):
    return [*RECIPES[recipe], "--groups_num", "1", "--image_size", str(args.image_size),
            "--cache_folder", os.path.join(args.out, "cache"), "--preresize_cache", os.path.join(args.out, "cache"),
            "--epochs_num", "1", "--iterations_per_epoch", str(iterations),
            "--val_every", str(args.val_every), "--checkpoint_every", str(args.val_every),
            "--no-keep_last_checkpoint", *[flag.format(dataset=args.dataset_folder) for flag in extra]]


def main(argv=None):
    args = parse_arguments(argv)
    start_time = time.time()
    test_sets = [os.path.join(args.dataset_folder, split) for split in ("val", "test")]
    if "untrained" in args.stages:
        for seed in args.extension_seeds:
            run(args, "eval.py", "untrained", seed, ["--test_set_folder", *test_sets], "results.json")
    if "curves" in args.stages:
        for seed in args.curve_seeds:
            for recipe in args.recipes:
                run(args, "train.py", f"curve_{recipe}", seed,
                    training_flags(args, recipe, args.curve_iterations), "test_results.json")
    if "extensions" in args.stages:
        for seed in args.extension_seeds:
            for extension in (e for e in args.extensions if e in EXTENSIONS):
                run(args, "train.py", f"{args.best_recipe}_{extension}", seed,
                    training_flags(args, args.best_recipe, args.extension_iterations, EXTENSIONS[extension]),
                    "test_results.json")
            plain_run = finished_run(args, f"{args.best_recipe}_plain", seed, "test_results.json")
            for evaluation in (e for e in args.extensions if e in EVALUATIONS and plain_run):
                run(args, "eval.py", f"{args.best_recipe}_{evaluation}", seed,
                    ["--resume_model", os.path.join(plain_run, "best_model.pth"), "--test_set_folder", *test_sets,
                     *[flag.format(dataset=args.dataset_folder) for flag in EVALUATIONS[evaluation]]],
                    "results.json")
    print(f"[study] all runs done in {time.time() - start_time:.0f} s", flush=True)
    if not args.dry_run:
        subprocess.run([sys.executable, os.path.join(REPO_ROOT, "make_report.py"), os.path.join(args.out, "runs"),
                        "--out", os.path.join(args.out, "report"), "--aggregate_seeds",
                        "--ignore_flags", *FLAGS_ADDED_DURING_THE_STUDY], cwd=REPO_ROOT, check=True)


if __name__ == "__main__":
    main()
