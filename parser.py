"""Command-line flags: one flag per idea, defaults that reproduce CosPlace, in groups; each script composes its
parser from the groups it really uses (SCRIPTS), so its --help shows only those and refuses the others.

This module imports nothing heavy, so that --help answers at once: the choices of the registries (backbones,
aggregators, losses, augmentations, optimizers, indexes) are read from the source of the module that owns them,
and the registries themselves are imported only after parsing, to check the names given (check_registries).
"""

import argparse
import ast
import importlib
import json
import logging
import os
import secrets
import sys

from core import cpu
from core.errors import UserError
from evaluation.settings import IndexSettings, InferenceSettings, RerankSettings

PROJECT_ROOT = os.path.dirname(os.path.abspath(__file__))
# Named sets of defaults (--recipe): flags given on the command line win over them
RECIPES = {
    "cosplace": {},
    "finetune": {"freeze_bn_stats": "all"},
}
# Flags that describe the network's architecture: read from the args.json beside a --resume_model checkpoint
ARCHITECTURE_FLAGS = ("backbone", "aggregator", "fc_output_dim", "mixvpr_depth", "mixvpr_out_rows",
                      "mixvpr_map_size", "netvlad_clusters", "boq_queries", "boq_layers", "boq_out_rows")
# Flags a script takes from that args.json unless given: eval.py tests at the resolution the model was tested with in
# training (a night R@1 moved from 52.6 to 68.4 between 224 px and the native size)
INHERITED_FLAGS = {"eval": ("test_image_size", "test_resize")}


class FlagError(UserError, ValueError):
    """A flag whose value cannot work (an unknown name, a value out of range): found after parsing."""


def checked_number(convert, accepts, expectation):
    """An argparse type: the value converted by convert (int, float) when accepts(number), else one error line
    'expected EXPECTATION, got VALUE', for a word that is no number too."""
    def parse(value):
        try:
            number = convert(value)
        except ValueError:
            number = None
        if number is None or not accepts(number):
            raise argparse.ArgumentTypeError(f"expected {expectation}, got {value}")
        return number
    return parse


positive_int = checked_number(int, lambda number: number >= 1, "a positive integer")
non_negative_int = checked_number(int, lambda number: number >= 0, "an integer >= 0")
positive_float = checked_number(float, lambda number: number > 0, "a number > 0")
non_negative_float = checked_number(float, lambda number: number >= 0, "a number >= 0")
seed_int = checked_number(int, lambda number: number >= -1, "a seed >= 0, or -1 for a random one")


def optional_int(value):
    return None if value.lower() in ("none", "original") else positive_int(value)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the help, and descriptions kept as written (the scripts' docstrings hold example commands)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser without abbreviated flags, whose errors are one line (exit status 2): argparse would print
    the whole usage first, 40 lines for train.py."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=HelpFormatter, allow_abbrev=False, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")


def registry_names(module_path, registry):
    """The names of a registry (a dict of name -> constructor, e.g. AGGREGATORS in model/aggregators.py), read from
    the module's source without importing it (torch would take seconds): the keys of `REGISTRY = {...}` and of
    `REGISTRY["name"] = ...` lines. check_registries checks the real registry after parsing."""
    with open(os.path.join(PROJECT_ROOT, module_path)) as file:
        tree = ast.parse(file.read())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict) and \
                any(isinstance(t, ast.Name) and t.id == registry for t in node.targets):
            names += [key.value for key in node.value.keys if isinstance(key, ast.Constant)]
        elif isinstance(node, ast.Assign):
            names += [t.slice.value for t in node.targets if isinstance(t, ast.Subscript) and
                      isinstance(t.value, ast.Name) and t.value.id == registry and isinstance(t.slice, ast.Constant)]
    return names


def names_of(module_path, registry):
    return ", ".join(registry_names(module_path, registry))


#### Flag groups: each adds one group of related flags to a parser

def add_classes_flags(parser):
    group = parser.add_argument_group("CosPlace classes and groups")
    group.add_argument("--M", type=positive_int, default=10, help="side of the UTM square cells of a class, in metres")
    group.add_argument("--alpha", type=positive_int, default=30, help="width of the heading bins of a class, in degrees")
    group.add_argument("--N", type=positive_int, default=5, help="cells between two classes of the same group, per axis")
    group.add_argument("--L", type=positive_int, default=2, help="heading bins between two classes of the same group")
    group.add_argument("--groups_num", type=positive_int, default=8,
                       help="groups to train on, the first ones in --groups_order (SF-XS train has 1: use "
                            "--groups_num 1)")
    group.add_argument("--groups_order", choices=["upstream", "size"], default="upstream",
                       help="order of the groups: upstream (CosPlace's: as they first appear in the sorted file list) "
                            "or size (largest first)")
    group.add_argument("--min_images_per_class", type=positive_int, default=10,
                       help="classes with fewer images are dropped")
    group.add_argument("--cache_folder", type=str, default="cache", help="where the class computation is cached")


def add_training_flags(parser):
    group = parser.add_argument_group("Training")
    group.add_argument("--recipe", choices=list(RECIPES), default="cosplace",
                       help="a named set of defaults: cosplace (the upstream recipe) or finetune (" +
                            ", ".join(f"--{k} {v}" for k, v in RECIPES["finetune"].items()) +
                            ": for a pretrained backbone, no recall dip in the first iterations); flags given "
                            "explicitly win over the recipe's")
    group.add_argument("--batch_size", type=positive_int, default=32, help="classes per batch (one image each)")
    group.add_argument("--epochs_num", type=positive_int, default=50, help="epochs; epoch e trains group e mod groups_num")
    group.add_argument("--iterations_per_epoch", type=positive_int, default=10000, help="iterations per epoch")
    group.add_argument("--lr", type=positive_float, default=0.00001, help="learning rate of the backbone and aggregation")
    group.add_argument("--classifiers_lr", type=positive_float, default=0.01, help="learning rate of the CosFace heads")
    group.add_argument("--optimizer", default="adam", metavar="NAME",
                       help=f"optimizer of the model and the heads: {names_of('training/optimizers.py', 'OPTIMIZERS')}")
    group.add_argument("--weight_decay", type=non_negative_float, default=0.0, help="weight decay of the optimizers")
    group.add_argument("--momentum", type=non_negative_float, default=0.9, help="momentum of --optimizer sgd")
    group.add_argument("--scheduler", default="none", metavar="NAME",
                       help=f"per-epoch lr schedule: {names_of('training/optimizers.py', 'SCHEDULES')} (plateau: on val R@1)")
    group.add_argument("--warmup_epochs", type=non_negative_int, default=0,
                       help="linear lr warm-up: epoch e < W trains at lr * (e+1)/(W+1), then the --scheduler starts")
    group.add_argument("--scheduler_step_size", type=positive_int, default=10,
                       help="--scheduler step: epochs between two multiplications of the lr by --scheduler_gamma")
    group.add_argument("--scheduler_gamma", type=positive_float, default=0.1,
                       help="lr multiplier of --scheduler step and plateau")
    group.add_argument("--scheduler_patience", type=non_negative_int, default=2,
                       help="--scheduler plateau: epochs without a better val R@1 before the lr is reduced")
    group.add_argument("--amp", choices=["none", "fp16", "bf16"], default="none",
                       help="mixed precision of the training steps: fp16 or bf16 on CUDA, bf16 on the CPU (where it has "
                            "bfloat16 units: see the start of the log); evaluation: --eval_amp")
    group.add_argument("--use_amp16", dest="amp", action="store_const", const="fp16", help="same as --amp fp16")
    group.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA; first steps are slow)")
    group.add_argument("--loss", default="cosface", metavar="NAME",
                       help=f"margin head of the per-group classifiers: {names_of('cosface_loss.py', 'MARGIN_HEADS')}")
    group.add_argument("--loss_scale", type=positive_float, default=30.0, help="scale s of the margin head's logits")
    group.add_argument("--loss_margin", type=non_negative_float, default=None,
                       help="margin m of the margin head; default: its published one (cosface 0.4, arcface 0.5, "
                            "sphereface 1.35; SphereFace's original is 4, with feature-norm logits and annealing)")
    group.add_argument("--train_all_layers", action="store_true",
                       help="train every backbone layer (default: see --trainable_stages)")
    group.add_argument("--trainable_stages", type=non_negative_int, default=None,
                       help="train only the last K stages of the backbone, freeze the others (ResNet: stem, layer1..4; "
                            "VGG16: its 5 conv blocks; timm: the modules of its feature_info, e.g. ViT blocks); "
                            "default: CosPlace's, 2 for ResNets (layer3, layer4), 1 for VGG16 (its last 5 layers), "
                            "2 for timm models")
    group.add_argument("--freeze_bn_stats", choices=["none", "frozen_stages", "all"], default="none",
                       help="keep the BatchNorm running statistics of the backbone as loaded (the layers stay in eval "
                            "mode; their weights still train where their stage does): none (CosPlace), only in the "
                            "frozen stages, or in all layers. Small, heavily augmented batches otherwise drag "
                            "pretrained statistics away, which costs recall in the first thousands of iterations")
    group.add_argument("--aggregator_init_images", type=positive_int, default=500,
                       help="training images whose features initialise a data-dependent aggregator before training "
                            "(netvlad: k-means on 100 local descriptors of each, as the original)")
    group.add_argument("--val_every", type=non_negative_int, default=0,
                       help="also validate every N iterations (counted over the whole training, starting with the "
                            "model as initialised), recorded in metrics.jsonl with the iteration and the images "
                            "seen; best_model.pth is the best of all validations (0: only at the end of each epoch)")
    group.add_argument("--checkpoint_every", type=non_negative_int, default=0,
                       help="also write last_checkpoint.pth every K iterations, counted over the whole training as "
                            "--val_every and --log_every (0: only at the end of each epoch)")
    group.add_argument("--keep_last_checkpoint", action=argparse.BooleanOptionalAction, default=True,
                       help="keep last_checkpoint.pth once the training has finished (model, heads and optimizer "
                            "states: 3-4x the model's size); --no-keep_last_checkpoint deletes it at the end, "
                            "best_model.pth stays")
    group.add_argument("--log_every", type=positive_int, default=100,
                       help="iterations between two reads of the loss, counted over the whole training (each read "
                            "waits for the device; the first one logs an estimate of the training time left)")
    group.add_argument("--tensorboard", action="store_true",
                       help="also write each metrics.jsonl record as TensorBoard scalars in RUN/tensorboard/, as it "
                            "is logged (val/R@N, train/, lr/, speed/, time/): watch with tensorboard --logdir logs/ "
                            "(needs pip install tensorboard)")
    group.add_argument("--resume_train", type=str, default=None,
                       help="last_checkpoint.pth of a run to continue (model, heads, optimizers, RNG)")


def add_model_flags(parser):
    group = parser.add_argument_group("Model")
    group.add_argument("--backbone", type=str, default="resnet18",
                       help=f"{names_of('model/backbones.py', 'BACKBONES')} (torchvision, CosPlace's layouts) or any "
                            f"timm model, e.g. efficientnet_lite0, convnext_tiny, vit_small_patch16_224 "
                            f"(timm.list_models() lists them; timm/NAME takes timm's version of a torchvision name)")
    group.add_argument("--aggregator", default="gem", metavar="NAME",
                       help=f"pooling that turns the feature map into a descriptor: "
                            f"{names_of('model/aggregators.py', 'AGGREGATORS')}")
    group.add_argument("--fc_output_dim", type=positive_int, default=512, help="descriptor dimension")
    group.add_argument("--pretrained", type=str, default="imagenet",
                       help="backbone initialisation: 'imagenet' (downloaded once), 'none', or a path to a weights "
                            "file; never fetched with --resume_model, whose weights replace them")
    group.add_argument("--resume_model", type=str, default=None,
                       help="model weights to start from (ours or a released CosPlace checkpoint); the architecture "
                            "flags are read from the args.json beside it when there is one")
    group = parser.add_argument_group("Aggregator options (the flags --NAME_OPTION go to --aggregator NAME)")
    group.add_argument("--mixvpr_depth", type=positive_int, default=4, help="mixvpr: feature-mixer blocks")
    group.add_argument("--mixvpr_out_rows", type=positive_int, default=4,
                       help="mixvpr: rows of the descriptor (each of fc_output_dim / rows channels)")
    group.add_argument("--mixvpr_map_size", type=positive_int, default=16,
                       help="mixvpr: the feature map is resized to SxS (16: CosPlace's 512 px images with a "
                            "stride-32 backbone)")
    group.add_argument("--netvlad_clusters", type=positive_int, default=64, help="netvlad: clusters K")
    group.add_argument("--boq_queries", type=positive_int, default=32, help="boq: learnable queries per block")
    group.add_argument("--boq_layers", type=positive_int, default=2, help="boq: BoQ blocks")
    group.add_argument("--boq_out_rows", type=positive_int, default=4,
                       help="boq: rows of the descriptor (each of fc_output_dim / rows channels)")


def add_augmentation_flags(parser):
    group = parser.add_argument_group("Augmentation (batched on the model's device)")
    group.add_argument("--augmentations", nargs="+", default=["color_jitter", "random_resized_crop"],
                       help=f"list of name or name:strength, applied in order: "
                            f"{names_of('augmentations.py', 'AUGMENTATIONS')}. The strength S of each: color_jitter:S "
                            f"scales --brightness, --contrast, --saturation and --hue by S (default 1); "
                            f"random_resized_crop:S keeps between 1-S and all of the image area (default "
                            f"--random_resized_crop); random_perspective:S moves the corners of half of the images by "
                            f"up to S of their size (default 0.5); random_erasing:S blacks out 0.02 to S of the area "
                            f"of half of the images (default 0.33); gaussian_blur:S blurs with a sigma of 0.1 to S "
                            f"pixels (default 2); grayscale:S and horizontal_flip:S act with probability S (default "
                            f"0.2 and 0.5); night:S makes the images night-like (darker, moonlight blue to street-lamp "
                            f"orange, sensor grain) at strength S in [0, 1] (default 1)")
    group.add_argument("--brightness", type=non_negative_float, default=0.7, help="color_jitter brightness")
    group.add_argument("--contrast", type=non_negative_float, default=0.7, help="color_jitter contrast")
    group.add_argument("--saturation", type=non_negative_float, default=0.7, help="color_jitter saturation")
    group.add_argument("--hue", type=non_negative_float, default=0.5, help="color_jitter hue (at most 0.5)")
    group.add_argument("--random_resized_crop", type=non_negative_float, default=0.5,
                       help="random_resized_crop keeps between 1-x and all of the image area")


def add_auxiliary_loss_flags(parser):
    group = parser.add_argument_group("Self-supervised auxiliary loss (between two augmented views of the batch)")
    group.add_argument("--ssl_loss", default="none", metavar="NAME",
                       help=f"none, or a self-supervised loss between two views of the batch: "
                            f"{names_of('training/ssl_losses.py', 'SSL_LOSSES')}")
    group.add_argument("--ssl_weight", type=non_negative_float, default=0.1, help="weight of the self-supervised loss")
    group.add_argument("--ssl_augmentations", nargs="+", default=["color_jitter", "random_resized_crop"],
                       help="augmentations of the second view (the first is the training batch), as --augmentations")
    group = parser.add_argument_group("Domain adaptation with DANN (towards unlabeled target images)")
    group.add_argument("--da_target_folder", type=str, default=None,
                       help="train with DANN against the images of this folder (any names, e.g. test queries)")
    group.add_argument("--da_weight", type=non_negative_float, default=0.1,
                       help="weight of the DANN domain-classification loss")


def add_adabn_flags(parser):
    parser.add_argument_group("Domain adaptation with AdaBN").add_argument(
        "--adabn_folder", type=str, default=None,
        help="AdaBN: recompute the BatchNorm statistics on the images of this folder before testing")


def add_inference_flags(parser):
    group = parser.add_argument_group("Descriptor extraction")
    group.add_argument("--infer_batch_size", type=positive_int, default=16, help="batch size of descriptor extraction")
    group.add_argument("--test_image_size", type=optional_int, default=None,
                       help="resize test images so that their shorter side is S (keeping the aspect ratio, as "
                            "upstream's --resize_test_imgs), or to SxS with --test_resize square; 'none' keeps each "
                            "image's size and batches same-size images")
    group.add_argument("--test_resize", choices=["shorter_side", "square"], default="shorter_side",
                       help="how --test_image_size resizes the test images")
    group.add_argument("--eval_amp", choices=["none", "fp16", "bf16"], default="none",
                       help="mixed precision of descriptor extraction: fp16 or bf16 on CUDA, bf16 on the CPU (none: fp32, "
                            "as upstream)")
    group.add_argument("--descriptors_cache", type=str, default=None,
                       help="folder of cached descriptors, keyed by the model's weights, the images and the "
                            "test flags (never stale): evaluating the same model again skips the extraction")
    group = parser.add_argument_group("Nearest-neighbour search")
    group.add_argument("--faiss_index", default="exact", metavar="NAME",
                       help=f"kNN index: {names_of('retrieval/faiss_indexes.py', 'FAISS_INDEXES')}: exact, or approximate for "
                            f"databases of millions of images: ivfpq (--faiss_nlist, --faiss_nprobe, --faiss_pq_m) or "
                            f"hnsw (--faiss_hnsw_m, --faiss_ef_search); an approximate index logs its size and its "
                            f"recall loss against exact")
    group.add_argument("--faiss_nlist", type=non_negative_int, default=0,
                       help="ivfpq: k-means cells of the database (0: 4 sqrt(database size))")
    group.add_argument("--faiss_nprobe", type=positive_int, default=32, help="ivfpq: cells searched per query")
    group.add_argument("--faiss_pq_m", type=positive_int, default=64,
                       help="ivfpq: bytes per database image (sub-quantizers; must divide --fc_output_dim)")
    group.add_argument("--faiss_hnsw_m", type=positive_int, default=32, help="hnsw: graph links per database image")
    group.add_argument("--faiss_ef_search", type=positive_int, default=128, help="hnsw: candidates explored per query")


def add_evaluation_flags(parser):
    group = parser.add_argument_group("Recall and predictions")
    group.add_argument("--positive_dist_threshold", type=positive_float, default=25,
                       help="a prediction is correct within this distance, in metres")
    group.add_argument("--recall_values", type=positive_int, nargs="+", default=[1, 5, 10, 20],
                       help="N of recall@N (sorted, in any order given)")
    group.add_argument("--num_preds_to_save", type=non_negative_int, default=0,
                       help="save, for each query, an image with its top-N predictions (0: none)")
    group.add_argument("--save_only_wrong_preds", action="store_true",
                       help="with --num_preds_to_save, only for queries whose top-1 is wrong")


def add_rerank_flags(parser):
    group = parser.add_argument_group("Re-ranking with local features (the final test; validations stay kNN only)")
    group.add_argument("--rerank", default="none", metavar="NAME",
                       help=f"none, or re-rank each query's first --rerank_k predictions by their number of local "
                            f"feature matches with it that a RANSAC homography verifies (ties keep the retrieval "
                            f"order): {names_of('reranking/matchers.py', 'MATCHERS')} (sift needs no weights, the others "
                            f"download theirs once)")
    group.add_argument("--rerank_k", type=positive_int, default=10,
                       help="predictions re-ranked per query (the time per query grows with it)")
    group.add_argument("--rerank_image_size", type=positive_int, default=384,
                       help="shorter side of the images the matcher sees, in pixels")
    group.add_argument("--rerank_keypoints", type=positive_int, default=1024,
                       help="local features per image at most (matches per pair for loftr)")


def add_dataset_flags(parser, splits, test_sets_num="1", query_folders=False):
    """--dataset_folder and a folder flag per split; test_sets_num '+' lets --test_set_folder take several;
    query_folders adds --query_folders (scripts that test on every query folder of a test set)."""
    group = parser.add_argument_group("Dataset")
    group.add_argument("--dataset_folder", type=str, default=None,
                       help="folder with " + ", ".join(f"{split}/" for split in splits) +
                            " (val and test each with database/ and queries/)")
    for split in splits:
        if split == "test" and test_sets_num == "+":
            group.add_argument("--test_set_folder", type=str, nargs="+", default=None,
                               help="one or more test sets, each with database/ and queries/ (default: "
                                    "DATASET_FOLDER/test)")
        else:
            group.add_argument(f"--{split}_set_folder", type=str, default=None,
                               help=f"default: DATASET_FOLDER/{split}")
        if split == "test" and query_folders:
            group.add_argument("--query_folders", nargs="+", default=None, metavar="NAME",
                               help="query folders of each test set, each evaluated against its database/ (one "
                                    "row each, the database computed once); default: every folder beside database/ "
                                    "that holds images, queries/ first (Tokyo-XS: queries/ and night/)")
    group.add_argument("--on_bad_name", choices=["error", "skip"], default="error",
                       help="file names not in the '@' format: stop, or skip them with a count")


def add_training_data_flags(parser):
    group = parser.add_argument_group("Training images")
    group.add_argument("--image_size", type=positive_int, default=512, help="training images are resized to SxS")
    group.add_argument("--preresize_cache", type=str, default=None,
                       help="write once into this folder the training images larger than --image_size, resized "
                            "to it (same file names; keyed by the images and the size, never stale), and train "
                            "from there: python -m datasets.preresize does the same ahead of time")


def add_loading_flags(parser):
    group = parser.add_argument_group("Image loading")
    group.add_argument("--num_workers", type=non_negative_int, default=min(8, os.cpu_count() or 1),
                       help="data-loading processes")
    group.add_argument("--on_bad_image", choices=["error", "skip"], default="error",
                       help="unreadable or corrupt images: stop, or skip them with a warning (training images when "
                            "loaded; with skip, test sets are checked first as with --check_images)")
    group.add_argument("--check_images", action="store_true",
                       help="decode every image (at 1/8 scale, in --num_workers threads) before starting, to report "
                            "all unreadable files at once; with --on_bad_image skip they are left out")
    group.add_argument("--decode_on_gpu", action="store_true",
                       help="the loader workers only read the JPEG files; each batch is decoded at once on the GPU "
                            "(nvJPEG) and resized there: for machines with few CPU cores per GPU")


def add_run_flags(parser, logs=True):
    group = parser.add_argument_group("Run")
    group.add_argument("--device", type=str, default="auto", help="auto (CUDA when present), cuda, cuda:N or cpu")
    group.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=True,
                       help="channels_last memory format: faster convolutions on the GPU (with AMP) and on the CPU "
                            "(1.35x ResNet-18 inference); --no-channels_last for the contiguous format")
    group.add_argument("--seed", type=seed_int, default=0,
                       help="seed of every random choice (same seed, same run on the CPU); -1 draws one, logged")
    if logs:
        group.add_argument("--save_dir", type=str, default="default", help="logs go to LOGS_ROOT/SAVE_DIR/<timestamp>")
        group.add_argument("--logs_root", type=str, default="logs", help="root folder of all runs' logs")


def add_eval_outputs_flags(parser):
    parser.add_argument_group("Outputs").add_argument(
        "--save_descriptors", action="store_true",
        help="write each test set's descriptors and predictions to descriptors.npz")


# Each script's flag groups, in the order of its --help
SCRIPTS = {
    "train": [add_classes_flags, add_training_flags, add_model_flags, add_augmentation_flags,
              add_auxiliary_loss_flags, add_adabn_flags, add_inference_flags, add_evaluation_flags, add_rerank_flags,
              lambda parser: add_dataset_flags(parser, ("train", "val", "test"), query_folders=True),
              add_training_data_flags, add_loading_flags, add_run_flags],
    "eval": [add_model_flags, add_adabn_flags, add_inference_flags, add_evaluation_flags, add_rerank_flags,
             lambda parser: add_dataset_flags(parser, ("test",), test_sets_num="+", query_folders=True),
             add_loading_flags, add_eval_outputs_flags, add_run_flags],
    "geolocalize": [add_model_flags, add_inference_flags, add_rerank_flags, add_loading_flags,
                    lambda parser: add_run_flags(parser, logs=False)],
    "analyze_dataset": [add_classes_flags, lambda parser: add_dataset_flags(parser, ("train", "val", "test")),
                        add_loading_flags],
    "preview_augmentations": [add_augmentation_flags, lambda parser: add_dataset_flags(parser, ("train",)),
                              lambda parser: add_run_flags(parser, logs=False)],
}


def build_parser(script="train", description=None):
    """The parser of a script of SCRIPTS, with the flags of its groups (the script adds its own)."""
    parser = ArgumentParser(description=description or "CosPlace: visual geo-localization by classification")
    for add_flags in SCRIPTS[script]:
        add_flags(parser)
    return parser


def explicit_flags(parser, argv):
    """The destinations of the flags given on the command line (not left to their defaults). The parsers take no
    abbreviated flags (ArgumentParser), so a flag given is one of the option strings."""
    destinations = {option: action.dest for action in parser._actions for option in action.option_strings}
    return {destinations[token.split("=")[0]] for token in (sys.argv[1:] if argv is None else argv)
            if token.split("=")[0] in destinations}


def fill_dataset_folders(parser, args, script):
    """Each split's folder from --dataset_folder when not given; the splits the script needs are required."""
    needed = {"train": ("train", "val", "test"), "eval": ("test",), "preview_augmentations": ("train",)}.get(script, ())
    for split in ("train", "val", "test"):
        attribute = f"{split}_set_folder"
        if hasattr(args, attribute) and getattr(args, attribute) is None and args.dataset_folder is not None:
            folder = os.path.join(args.dataset_folder, split)
            setattr(args, attribute, [folder] if script == "eval" else folder)
    missing = [split for split in needed if getattr(args, f"{split}_set_folder") is None]
    if missing:
        parser.error(f"give --dataset_folder, or each of {', '.join(f'--{m}_set_folder' for m in missing)}")


def read_architecture(parser, args, given, inherited=()):
    """With --resume_model, the architecture flags come from the args.json beside the checkpoint (when present):
    a flag given that contradicts it is an error naming both values. The inherited flags (INHERITED_FLAGS) come
    from it too, unless given. Returns {flag: value} of the flags taken."""
    args_path = os.path.join(os.path.dirname(os.path.abspath(args.resume_model)), "args.json")
    if not os.path.isfile(args_path):
        return {}
    try:
        with open(args_path) as file:
            run_args = json.load(file)
    except (OSError, ValueError) as error:
        parser.error(f"{args_path} (beside --resume_model) cannot be read ({error}): remove or repair it")
    if not isinstance(run_args, dict):
        parser.error(f"{args_path} (beside --resume_model) holds a JSON {type(run_args).__name__}, not the flags of "
                     f"a run: remove or repair it")
    taken = {}
    for flag in ARCHITECTURE_FLAGS:
        if flag not in run_args:
            continue
        if flag in given and getattr(args, flag) != run_args[flag]:
            parser.error(f"--{flag} {getattr(args, flag)} contradicts the checkpoint's --{flag} {run_args[flag]} "
                         f"({args_path}): drop --{flag}, or choose another --resume_model")
        if getattr(args, flag) != run_args[flag]:
            taken[flag] = run_args[flag]
        setattr(args, flag, run_args[flag])
    for flag in inherited:
        if flag in run_args and flag not in given and getattr(args, flag) != run_args[flag]:
            taken[flag] = run_args[flag]
            setattr(args, flag, run_args[flag])
    return taken


def check_arguments(parser, args, script):
    """Refuses contradictory or impossible flags with the reason; fills what derives from others."""
    if hasattr(args, "dataset_folder"):
        fill_dataset_folders(parser, args, script)
    if getattr(args, "image_size", 32) < 32:
        parser.error(f"--image_size {args.image_size} is too small: the backbones downsample by 32, use at least 32")
    if getattr(args, "test_image_size", None) is not None and args.test_image_size < 32:
        parser.error(f"--test_image_size {args.test_image_size} is too small: use at least 32")
    if getattr(args, "faiss_index", None) == "ivfpq" and args.fc_output_dim % args.faiss_pq_m:
        parser.error(f"--faiss_pq_m {args.faiss_pq_m} must divide --fc_output_dim {args.fc_output_dim}")
    if not 0 <= getattr(args, "random_resized_crop", 0) < 1:
        parser.error("--random_resized_crop must be in [0, 1): it is the largest fraction of the area cropped away")
    if getattr(args, "hue", 0) > 0.5:
        parser.error(f"--hue {args.hue}: the hue shift is at most 0.5 (half a turn)")
    if getattr(args, "save_only_wrong_preds", False) and args.num_preds_to_save == 0:
        parser.error("--save_only_wrong_preds needs --num_preds_to_save N (N > 0)")
    if getattr(args, "train_all_layers", False) and args.trainable_stages is not None:
        parser.error("--train_all_layers trains every stage: drop --trainable_stages (or --train_all_layers)")
    if getattr(args, "resume_train", None) and args.resume_model:
        parser.error("--resume_train already restores the model: drop --resume_model")
    if hasattr(args, "recall_values"):  # recalls are cumulative: computed and reported in ascending N
        args.recall_values = sorted(set(args.recall_values))
    if getattr(args, "seed", 0) == -1:  # upstream's "not deterministic": a random seed, recorded so it can be reused
        args.seed = secrets.randbelow(2 ** 31)
        args.seed_drawn = True


# Flags whose value must be a name of a registry: flag -> (module, registry, names also accepted)
REGISTRY_FLAGS = {"optimizer": ("training.optimizers", "OPTIMIZERS", ()),
                  "scheduler": ("training.optimizers", "SCHEDULES", ()),
                  "loss": ("cosface_loss", "MARGIN_HEADS", ()), "aggregator": ("model.aggregators", "AGGREGATORS", ()),
                  "ssl_loss": ("training.ssl_losses", "SSL_LOSSES", ("none",)),
                  "faiss_index": ("retrieval.faiss_indexes", "FAISS_INDEXES", ()),
                  "rerank": ("reranking.matchers", "MATCHERS", ("none",))}


def check_registries(args):
    """Checks every registry name given against the registry itself (imported here, after parsing, so that --help
    stays fast), before any dataset is read: an unknown name is a FlagError listing the known ones."""
    for flag, (module, registry, also_accepted) in REGISTRY_FLAGS.items():
        if hasattr(args, flag):
            names = [*also_accepted, *getattr(importlib.import_module(module), registry)]
            if getattr(args, flag) not in names:
                raise FlagError(f"--{flag} {getattr(args, flag)} is unknown: choose one of {', '.join(names)}")
    if hasattr(args, "backbone"):
        importlib.import_module("model.backbones").check_backbone_name(args.backbone)
    for flag in ("augmentations", "ssl_augmentations"):
        if hasattr(args, flag):
            importlib.import_module("augmentations").check_augmentation_specs(getattr(args, flag),
                                                                              augmentation_defaults(args), flag)


def parse_arguments(script="train", argv=None, parser=None):
    """Parses and checks the flags of a script of SCRIPTS (parser: the script's own, built by build_parser and
    extended). Sets args.flags_from_checkpoint to the architecture (and inherited) flags read beside --resume_model."""
    parser = parser or build_parser(script)
    if script == "train":  # the recipe's values become defaults, so that explicit flags still win
        parser.set_defaults(**RECIPES[parser.parse_known_args(argv)[0].recipe])
    args = parser.parse_args(argv)
    check_arguments(parser, args, script)
    args.flags_from_checkpoint = read_architecture(parser, args, explicit_flags(parser, argv),
                                                   INHERITED_FLAGS.get(script, ())) \
        if getattr(args, "resume_model", None) else {}
    check_registries(args)
    return args


#### What the flags became, logged at the start of a run (core.logs.start_run)

def implicit_settings(args):
    """What was not given as such, as (logging level, line): the seed drawn for --seed -1, the flags read beside
    --resume_model, the recipe in force, on the CPU whether it computes bfloat16 natively (core/cpu.py), and once
    which flags have no effect on this device (instead of ignoring them silently)."""
    notes = []
    if getattr(args, "seed_drawn", False):
        notes.append((logging.INFO, f"--seed -1: drew the seed {args.seed} (pass --seed {args.seed} to repeat this "
                                    f"run)"))
    for flag, value in args.flags_from_checkpoint.items():
        notes.append((logging.INFO, f"--{flag} {value}: taken from the args.json beside --resume_model "
                                    f"{args.resume_model}"))
    if hasattr(args, "recipe"):
        notes.append((logging.INFO, f"Recipe {args.recipe}: BatchNorm statistics frozen: {args.freeze_bn_stats}"))
    on_cpu = not args.device.startswith("cuda")
    if on_cpu:
        bf16 = [f"--{flag} bf16" for flag in ("amp", "eval_amp") if getattr(args, flag, "none") == "bf16"]
        is_warning, note = cpu.bf16_note(bf16)
        notes.append((logging.WARNING if is_warning else logging.INFO, note))
    ineffective = [f"--{flag} fp16" for flag in ("amp", "eval_amp") if on_cpu and getattr(args, flag, "none") == "fp16"]
    ineffective += ["--decode_on_gpu"] if on_cpu and getattr(args, "decode_on_gpu", False) else []
    if ineffective:
        notes.append((logging.WARNING, f"{', '.join(ineffective)}: no effect on the CPU (fp16 runs in fp32 there, "
                                       f"use bf16; decoding stays on the CPU)"))
    return notes


#### From flags to settings: the Namespace stops at the scripts, which hand these to the library

def model_options(args):
    """Keyword arguments of model.network.GeoLocalizationNet from the flags, so that train, eval and geolocalize
    build the same network. Weights that a checkpoint (--resume_model, --resume_train) will replace are never
    fetched: that works offline. The training flags (frozen stages and statistics) are absent from the evaluation
    scripts: nothing is frozen there, and their log does not speak of training stages."""
    flags = vars(args)
    from_checkpoint = flags.get("resume_model") or flags.get("resume_train")
    prefix = f"{args.aggregator}_"  # --mixvpr_depth -> depth of the mixvpr aggregator
    return {"backbone": args.backbone, "fc_output_dim": args.fc_output_dim, "aggregator": args.aggregator,
            "pretrained": "none" if from_checkpoint else args.pretrained,
            "train_all_layers": flags.get("train_all_layers", False),
            "trainable_stages": flags.get("trainable_stages"),
            "aggregator_options": {key[len(prefix):]: value for key, value in flags.items() if key.startswith(prefix)},
            "freeze_bn_stats": flags.get("freeze_bn_stats", "none"), "for_training": "trainable_stages" in flags}


def augmentation_defaults(args):
    """The augmentations' AugmentationDefaults of the flags (--image_size, --brightness ... --random_resized_crop)."""
    return importlib.import_module("augmentations").AugmentationDefaults(
        args.image_size, args.brightness, args.contrast, args.saturation, args.hue, args.random_resized_crop)


def optimizer_settings(args):
    """The OptimizerSettings of --optimizer, --weight_decay, --momentum."""
    return importlib.import_module("training.optimizers").OptimizerSettings(args.optimizer, args.weight_decay,
                                                                            args.momentum)


def schedule_settings(args):
    """The ScheduleSettings of --scheduler, --epochs_num, --warmup_epochs and the --scheduler_* flags."""
    return importlib.import_module("training.optimizers").ScheduleSettings(
        args.scheduler, args.epochs_num, args.warmup_epochs, args.scheduler_step_size, args.scheduler_gamma,
        args.scheduler_patience)


def inference_settings(args):
    """How the descriptors are computed (--infer_batch_size, --eval_amp, --descriptors_cache ...)."""
    return InferenceSettings(args.device, args.infer_batch_size, args.num_workers, args.eval_amp, args.channels_last,
                             args.decode_on_gpu, args.descriptors_cache)


def index_settings(args):
    """The kNN index of the --faiss_* flags."""
    return IndexSettings(args.faiss_index, args.faiss_nlist, args.faiss_nprobe, args.faiss_pq_m, args.faiss_hnsw_m,
                         args.faiss_ef_search)


def rerank_settings(args):
    """The re-ranking of the --rerank* flags, None without --rerank."""
    if args.rerank == "none":
        return None
    return RerankSettings(args.rerank, args.rerank_k, args.rerank_image_size, args.rerank_keypoints)


def test_dataset_options(args):
    """Keyword arguments of datasets.test_dataset.TestDataset / query_sets from the flags."""
    return {"positive_dist_threshold": args.positive_dist_threshold, "image_size": args.test_image_size,
            "on_bad_name": args.on_bad_name, "decode_on_gpu": args.decode_on_gpu, "test_resize": args.test_resize}


def flag_tables_markdown():
    """The flag tables of docs/flags.md: one per flag group, with the scripts that take it (a test checks that
    docs/flags.md holds exactly this text; regenerate it with parser.flag_tables_markdown())."""
    groups = {}
    for script in SCRIPTS:
        for group in build_parser(script)._action_groups:
            actions = [a for a in group._group_actions if a.option_strings and a.dest != "help"]
            if actions:
                entry = groups.setdefault(group.title, {"scripts": [], "actions": {}})
                entry["scripts"].append(f"{script}.py")
                entry["actions"].update({", ".join(f"`{o}`" for o in a.option_strings): a for a in actions})
    lines = []
    for title, entry in groups.items():
        lines += [f"**{title}** ({', '.join(entry['scripts'])})", "", "| flag | default | meaning |", "|---|---|---|"]
        for option, action in entry["actions"].items():
            default = "off" if action.default is False else ("on" if action.default is True else action.default)
            default = " ".join(map(str, default)) if isinstance(default, list) else default
            default = "min(8, CPU cores)" if option == "`--num_workers`" else default  # the same on every machine
            meaning = " ".join((action.help or "").split()).replace("|", "\\|")
            lines.append(f"| {option} | `{default}` | {meaning} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
