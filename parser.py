"""Command-line flags of train.py and eval.py: one flag per idea, defaults that reproduce CosPlace."""

import argparse
import os


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


def build_parser(is_training=True):
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter,
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
    group.add_argument("--amp", choices=["none", "fp16", "bf16"], default="none",
                       help="mixed precision on CUDA (ignored on the CPU)")
    group.add_argument("--use_amp16", dest="amp", action="store_const", const="fp16", help="same as --amp fp16")
    group.add_argument("--channels_last", action="store_true", help="channels_last memory format (faster convs on GPU)")
    group.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA; first steps are slow)")
    group.add_argument("--seed", type=int, default=0, help="seed of every random choice: same seed, same run on CPU")
    group.add_argument("--checkpoint_every", type=non_negative_int, default=0,
                       help="also write last_checkpoint.pth every K iterations inside an epoch (0: only at epoch end)")
    group.add_argument("--log_every", type=positive_int, default=100,
                       help="iterations between two reads of the loss (each read waits for the device)")
    # Model
    group = parser.add_argument_group("Model")
    group.add_argument("--backbone", type=str, default="resnet18",
                       help="resnet18, resnet50, resnet101, resnet152, vgg16 (torchvision)")
    group.add_argument("--aggregator", type=str, default="gem", help="pooling that turns the feature map into a descriptor")
    group.add_argument("--fc_output_dim", type=positive_int, default=512, help="descriptor dimension")
    group.add_argument("--train_all_layers", action="store_true",
                       help="train every backbone layer (default: freeze the layers before ResNet's layer3)")
    group.add_argument("--pretrained", type=str, default="imagenet",
                       help="backbone initialisation: 'imagenet' (downloaded once), 'none', or a path to a weights file")
    group.add_argument("--loss", type=str, default="cosface", help="margin head of the per-group classifiers")
    group.add_argument("--loss_scale", type=float, default=30.0, help="scale s of the margin head's logits")
    group.add_argument("--loss_margin", type=float, default=0.40, help="margin m of the margin head")
    # Augmentation
    group = parser.add_argument_group("Augmentation (batched on the model's device)")
    group.add_argument("--augmentations", nargs="+", default=["color_jitter", "random_resized_crop"],
                       help="list of name or name:strength, applied in order")
    group.add_argument("--brightness", type=float, default=0.7, help="color_jitter brightness")
    group.add_argument("--contrast", type=float, default=0.7, help="color_jitter contrast")
    group.add_argument("--saturation", type=float, default=0.7, help="color_jitter saturation")
    group.add_argument("--hue", type=float, default=0.5, help="color_jitter hue (at most 0.5)")
    group.add_argument("--random_resized_crop", type=float, default=0.5,
                       help="random_resized_crop keeps between 1-x and all of the image area")
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
    group.add_argument("--save_only_wrong_preds", action="store_true",
                       help="with --num_preds_to_save, only for queries whose top-1 is wrong")
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
                       help="unreadable or corrupt images: stop, or skip them with a warning")
    group.add_argument("--cache_folder", type=str, default="cache", help="where the class computation is cached")
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
    if not 0 <= args.random_resized_crop < 1:
        parser.error("--random_resized_crop must be in [0, 1): it is the largest fraction of the area cropped away")
    if args.save_only_wrong_preds and args.num_preds_to_save == 0:
        parser.error("--save_only_wrong_preds needs --num_preds_to_save N (N > 0)")
    if is_training and args.resume_train and args.resume_model:
        parser.error("--resume_train already restores the model: drop --resume_model")


def parse_arguments(is_training=True, argv=None):
    parser = build_parser(is_training)
    args = parser.parse_args(argv)
    check_arguments(parser, args, is_training)
    return args
