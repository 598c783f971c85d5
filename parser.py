"""Command-line flags of train.py and eval.py: one flag per idea, defaults that reproduce CosPlace."""

import argparse
import os

from cosface_loss import MARGIN_HEADS
from model.aggregators import AGGREGATORS
from model.backbones import BACKBONES
from optimizers import OPTIMIZERS, SCHEDULES
from ssl_losses import SSL_LOSSES
from test import FAISS_INDEXES


# Named sets of defaults (--recipe): flags given on the command line win over them
RECIPES = {
    "cosplace": {},
    "finetune": {"freeze_bn_stats": "all"},
}


def positive_int(value):
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return number


def non_negative_int(value):
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return number


def optional_int(value):
    return None if value.lower() in ("none", "original") else positive_int(value)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the help, and descriptions kept as written (the scripts' docstrings hold example commands)."""


def build_parser(is_training=True):
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter,
                                     description="CosPlace: visual geo-localization by classification")
    # CosPlace groups
    group = parser.add_argument_group("CosPlace classes and groups")
    group.add_argument("--M", type=positive_int, default=10, help="side of the UTM square cells of a class, in metres")
    group.add_argument("--alpha", type=positive_int, default=30, help="width of the heading bins of a class, in degrees")
    group.add_argument("--N", type=positive_int, default=5, help="cells between two classes of the same group, per axis")
    group.add_argument("--L", type=positive_int, default=2, help="heading bins between two classes of the same group")
    group.add_argument("--groups_num", type=positive_int, default=8,
                       help="groups to train on, largest first (SF-XS train has 1: use --groups_num 1)")
    group.add_argument("--min_images_per_class", type=positive_int, default=10,
                       help="classes with fewer images are dropped")
    # Training
    group = parser.add_argument_group("Training")
    group.add_argument("--batch_size", type=positive_int, default=32, help="classes per batch (one image each)")
    group.add_argument("--epochs_num", type=positive_int, default=50, help="epochs; epoch e trains group e mod groups_num")
    group.add_argument("--iterations_per_epoch", type=positive_int, default=10000, help="iterations per epoch")
    group.add_argument("--lr", type=float, default=0.00001, help="learning rate of the backbone and aggregation")
    group.add_argument("--classifiers_lr", type=float, default=0.01, help="learning rate of the CosFace heads")
    group.add_argument("--optimizer", choices=list(OPTIMIZERS), default="adam",
                       help="optimizer of the model and the heads (optimizers.py)")
    group.add_argument("--weight_decay", type=float, default=0.0, help="weight decay of the optimizers")
    group.add_argument("--momentum", type=float, default=0.9, help="momentum of --optimizer sgd")
    group.add_argument("--scheduler", choices=list(SCHEDULES), default="none",
                       help="per-epoch lr schedule: none (constant), cosine, step, or plateau (on val R@1)")
    group.add_argument("--warmup_epochs", type=non_negative_int, default=0,
                       help="linear lr warm-up: epoch e < W trains at lr * (e+1)/(W+1), then the --scheduler starts")
    group.add_argument("--scheduler_step_size", type=positive_int, default=10,
                       help="--scheduler step: epochs between two multiplications of the lr by --scheduler_gamma")
    group.add_argument("--scheduler_gamma", type=float, default=0.1,
                       help="lr multiplier of --scheduler step and plateau")
    group.add_argument("--scheduler_patience", type=non_negative_int, default=2,
                       help="--scheduler plateau: epochs without a better val R@1 before the lr is reduced")
    group.add_argument("--amp", choices=["none", "fp16", "bf16"], default="none",
                       help="mixed precision on CUDA (ignored on the CPU)")
    group.add_argument("--use_amp16", dest="amp", action="store_const", const="fp16", help="same as --amp fp16")
    group.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=True,
                       help="channels_last memory format: faster convolutions on the GPU (with --amp) and on the CPU "
                            "(1.35x ResNet-18 inference); --no-channels_last for the contiguous format")
    group.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA; first steps are slow)")
    group.add_argument("--seed", type=int, default=0, help="seed of every random choice: same seed, same run on CPU")
    group.add_argument("--checkpoint_every", type=non_negative_int, default=0,
                       help="also write last_checkpoint.pth every K iterations inside an epoch (0: only at epoch end)")
    group.add_argument("--val_every", type=non_negative_int, default=0,
                       help="also validate every N iterations (counted over the whole training), recorded in "
                            "metrics.jsonl with the iteration and the images seen; best_model.pth is the best of all "
                            "validations (0: only at the end of each epoch, as CosPlace)")
    group.add_argument("--recipe", choices=list(RECIPES), default="cosplace",
                       help="a named set of defaults: cosplace (the upstream recipe) or finetune (" +
                            ", ".join(f"--{k} {v}" for k, v in RECIPES["finetune"].items()) +
                            ": for a pretrained backbone, no recall dip in the first iterations); flags given "
                            "explicitly win over the recipe's")
    group.add_argument("--keep_last_checkpoint", action=argparse.BooleanOptionalAction, default=True,
                       help="keep last_checkpoint.pth once the training has finished (model, heads and optimizer "
                            "states: 3-4x the model's size); --no-keep_last_checkpoint deletes it at the end, "
                            "best_model.pth stays")
    group.add_argument("--log_every", type=positive_int, default=100,
                       help="iterations between two reads of the loss (each read waits for the device)")
    # Model
    group = parser.add_argument_group("Model")
    group.add_argument("--backbone", type=str, default="resnet18",
                       help=f"{', '.join(BACKBONES)} (torchvision, CosPlace's layouts) or any timm model, e.g. "
                            f"efficientnetv2_s, convnext_tiny, vit_small_patch16_224 (timm.list_models() lists them; "
                            f"timm/NAME takes timm's version of a torchvision name)")
    group.add_argument("--aggregator", choices=list(AGGREGATORS), default="gem",
                       help="pooling that turns the feature map into a descriptor (model/aggregators.py)")
    group.add_argument("--fc_output_dim", type=positive_int, default=512, help="descriptor dimension")
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
    group.add_argument("--pretrained", type=str, default="imagenet",
                       help="backbone initialisation: 'imagenet' (downloaded once), 'none', or a path to a weights file")
    group.add_argument("--loss", choices=list(MARGIN_HEADS), default="cosface",
                       help="margin head of the per-group classifiers (cosface_loss.py)")
    group.add_argument("--loss_scale", type=float, default=30.0, help="scale s of the margin head's logits")
    group.add_argument("--loss_margin", type=float, default=None,
                       help="margin m of the margin head; default: its published one (" +
                            ", ".join(f"{name} {head.default_margin}" for name, head in MARGIN_HEADS.items()) +
                            "; SphereFace's original is 4, with feature-norm logits and annealing)")
    # Aggregators' options
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
    group.add_argument("--aggregator_init_images", type=positive_int, default=500,
                       help="training images whose features initialise a data-dependent aggregator before training "
                            "(netvlad: k-means on 100 local descriptors of each, as the original)")
    # Augmentation
    group = parser.add_argument_group("Augmentation (batched on the model's device)")
    group.add_argument("--augmentations", nargs="+", default=["color_jitter", "random_resized_crop"],
                       help="list of name or name:strength, applied in order: color_jitter, random_resized_crop, "
                            "random_perspective, random_erasing, gaussian_blur, grayscale, horizontal_flip, night "
                            "(augmentations.py says what each strength means)")
    group.add_argument("--brightness", type=float, default=0.7, help="color_jitter brightness")
    group.add_argument("--contrast", type=float, default=0.7, help="color_jitter contrast")
    group.add_argument("--saturation", type=float, default=0.7, help="color_jitter saturation")
    group.add_argument("--hue", type=float, default=0.5, help="color_jitter hue (at most 0.5)")
    group.add_argument("--random_resized_crop", type=float, default=0.5,
                       help="random_resized_crop keeps between 1-x and all of the image area")
    # Self-supervised auxiliary loss
    group = parser.add_argument_group("Self-supervised auxiliary loss (between two augmented views of the batch)")
    group.add_argument("--ssl_loss", choices=["none", *SSL_LOSSES], default="none",
                       help="self-supervised loss between two views of the batch (ssl_losses.py)")
    group.add_argument("--ssl_weight", type=float, default=0.1, help="weight of the self-supervised loss")
    group.add_argument("--ssl_augmentations", nargs="+", default=["color_jitter", "random_resized_crop"],
                       help="augmentations of the second view (the first is the training batch), as --augmentations")
    # Domain adaptation
    group = parser.add_argument_group("Domain adaptation (towards unlabeled target images)")
    group.add_argument("--da_target_folder", type=str, default=None,
                       help="train with DANN against the images of this folder (any names, e.g. test queries)")
    group.add_argument("--da_weight", type=float, default=0.1, help="weight of the DANN domain-classification loss")
    group.add_argument("--adabn_folder", type=str, default=None,
                       help="AdaBN: recompute the BatchNorm statistics on the images of this folder before testing")
    # Validation, test
    group = parser.add_argument_group("Validation and test")
    group.add_argument("--infer_batch_size", type=positive_int, default=16, help="batch size of descriptor extraction")
    group.add_argument("--positive_dist_threshold", type=float, default=25,
                       help="a prediction is correct within this distance, in metres")
    group.add_argument("--recall_values", type=positive_int, nargs="+", default=[1, 5, 10, 20], help="N of recall@N")
    group.add_argument("--test_image_size", type=optional_int, default=None,
                       help="resize test images to SxS; 'none' keeps each image's size and batches same-size images")
    group.add_argument("--resume_model", type=str, default=None,
                       help="model weights to start from (ours or a released CosPlace checkpoint)")
    group.add_argument("--num_preds_to_save", type=non_negative_int, default=0,
                       help="save, for each query, an image with its top-N predictions (0: none)")
    if not is_training:
        group.add_argument("--save_descriptors", action="store_true",
                           help="write each test set's descriptors and predictions to descriptors.npz")
    group.add_argument("--save_only_wrong_preds", action="store_true",
                       help="with --num_preds_to_save, only for queries whose top-1 is wrong")
    group.add_argument("--descriptors_cache", type=str, default=None,
                       help="folder of cached test-set descriptors, keyed by the model's weights, the images and the "
                            "test flags (never stale): evaluating the same model again skips the extraction")
    group.add_argument("--faiss_index", choices=list(FAISS_INDEXES), default="exact",
                       help="kNN index: exact, or approximate for databases of millions of images: ivfpq "
                            "(--faiss_nlist, --faiss_nprobe, --faiss_pq_m) or hnsw (--faiss_hnsw_m, "
                            "--faiss_ef_search); an approximate index logs its size and its recall loss against exact")
    group.add_argument("--faiss_nlist", type=non_negative_int, default=0,
                       help="ivfpq: k-means cells of the database (0: 4 sqrt(database size))")
    group.add_argument("--faiss_nprobe", type=positive_int, default=32, help="ivfpq: cells searched per query")
    group.add_argument("--faiss_pq_m", type=positive_int, default=64,
                       help="ivfpq: bytes per database image (sub-quantizers; must divide --fc_output_dim)")
    group.add_argument("--faiss_hnsw_m", type=positive_int, default=32, help="hnsw: graph links per database image")
    group.add_argument("--faiss_ef_search", type=positive_int, default=128, help="hnsw: candidates explored per query")
    # Resume
    if is_training:
        parser.add_argument("--resume_train", type=str, default=None,
                            help="last_checkpoint.pth of a run to continue (model, heads, optimizers, RNG)")
    # Data and input pipeline
    group = parser.add_argument_group("Data")
    group.add_argument("--dataset_folder", type=str, default=None,
                       help="folder with train/, val/ and test/ (each of val and test with database/ and queries/)")
    group.add_argument("--train_set_folder", type=str, default=None, help="default: DATASET_FOLDER/train")
    group.add_argument("--val_set_folder", type=str, default=None, help="default: DATASET_FOLDER/val")
    if is_training:
        group.add_argument("--test_set_folder", type=str, default=None, help="default: DATASET_FOLDER/test")
    else:
        group.add_argument("--test_set_folder", type=str, nargs="+", default=None,
                           help="one or more test sets, each with database/ and queries/ (default: DATASET_FOLDER/test)")
    group.add_argument("--image_size", type=positive_int, default=512, help="training images are resized to SxS")
    group.add_argument("--num_workers", type=non_negative_int, default=min(8, os.cpu_count() or 1),
                       help="data-loading processes")
    group.add_argument("--on_bad_name", choices=["error", "skip"], default="error",
                       help="file names not in the '@' format: stop, or skip them with a count")
    group.add_argument("--on_bad_image", choices=["error", "skip"], default="error",
                       help="unreadable or corrupt images: stop, or skip them with a warning (training images when "
                            "loaded; with skip, test sets are checked first as with --check_images)")
    group.add_argument("--check_images", action="store_true",
                       help="decode every image (at 1/8 scale, in --num_workers threads) before starting, to report "
                            "all unreadable files at once; with --on_bad_image skip they are left out of the classes")
    group.add_argument("--cache_folder", type=str, default="cache", help="where the class computation is cached")
    group.add_argument("--decode_on_gpu", action="store_true",
                       help="the loader workers only read the JPEG files; each batch is decoded at once on the GPU "
                            "(nvJPEG) and resized there: for machines with few CPU cores per GPU")
    if is_training:
        group.add_argument("--preresize_cache", type=str, default=None,
                           help="write once into this folder the training images larger than --image_size, resized "
                                "to it (same file names; keyed by the images and the size, never stale), and train "
                                "from there: python -m datasets.preresize does the same ahead of time")
    # Run
    group = parser.add_argument_group("Run")
    group.add_argument("--device", type=str, default="auto", help="auto (CUDA when present), cuda, cuda:N or cpu")
    group.add_argument("--save_dir", type=str, default="default", help="logs go to LOGS_ROOT/SAVE_DIR/<timestamp>")
    group.add_argument("--logs_root", type=str, default="logs", help="root folder of all runs' logs")
    return parser


def check_arguments(parser, args, is_training):
    """Fills the dataset folders and refuses contradictory flags with the reason."""
    for split in ("train", "val", "test"):
        attribute = f"{split}_set_folder"
        if getattr(args, attribute) is None and args.dataset_folder is not None:
            folder = os.path.join(args.dataset_folder, split)
            setattr(args, attribute, folder if is_training or split != "test" else [folder])
    needed = ["train_set_folder", "val_set_folder", "test_set_folder"] if is_training else ["test_set_folder"]
    missing = [name for name in needed if getattr(args, name) is None]
    if missing:
        parser.error(f"give --dataset_folder, or each of {', '.join('--' + m for m in missing)}")
    if args.image_size < 32:
        parser.error(f"--image_size {args.image_size} is too small: the backbones downsample by 32, use at least 32")
    if args.test_image_size is not None and args.test_image_size < 32:
        parser.error(f"--test_image_size {args.test_image_size} is too small: use at least 32")
    if args.faiss_index == "ivfpq" and args.fc_output_dim % args.faiss_pq_m:
        parser.error(f"--faiss_pq_m {args.faiss_pq_m} must divide --fc_output_dim {args.fc_output_dim}")
    if not 0 <= args.random_resized_crop < 1:
        parser.error("--random_resized_crop must be in [0, 1): it is the largest fraction of the area cropped away")
    if args.save_only_wrong_preds and args.num_preds_to_save == 0:
        parser.error("--save_only_wrong_preds needs --num_preds_to_save N (N > 0)")
    if args.train_all_layers and args.trainable_stages is not None:
        parser.error("--train_all_layers trains every stage: drop --trainable_stages (or --train_all_layers)")
    if is_training and args.resume_train and args.resume_model:
        parser.error("--resume_train already restores the model: drop --resume_model")


def parse_arguments(is_training=True, argv=None):
    parser = build_parser(is_training)
    if is_training:  # the recipe's values become defaults, so that explicit flags still win
        parser.set_defaults(**RECIPES[parser.parse_known_args(argv)[0].recipe])
    args = parser.parse_args(argv)
    check_arguments(parser, args, is_training)
    return args
