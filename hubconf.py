"""torch.hub entry point, with the original CosPlace's signature, so that a course notebook works unchanged:

    model = torch.hub.load("gmberton/cosplace", "get_trained_model", backbone="ResNet50", fc_output_dim=2048)
    model = torch.hub.load(REPO_DIR, "get_trained_model", source="local", checkpoint="logs/.../best_model.pth")

The first downloads CosPlace's released weights (trained on SF-XL); the second builds a run of ours from the args.json
beside the checkpoint and loads exactly its weights. Either model is in eval mode and gives L2-normalised descriptors.
"""

dependencies = ["torch", "torchvision", "timm"]

import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402

import torch  # noqa: E402

from training import checkpoints  # noqa: E402
import parser  # noqa: E402
from core.errors import UserError  # noqa: E402
from model import network  # noqa: E402

# Backbone -> the descriptor dimensions of the released weights (upstream's AVAILABLE_TRAINED_MODELS)
AVAILABLE_TRAINED_MODELS = {
    "VGG16": [64, 128, 256, 512],
    "ResNet18": [32, 64, 128, 256, 512],
    "ResNet50": [32, 64, 128, 256, 512, 1024, 2048],
    "ResNet101": [32, 64, 128, 256, 512, 1024, 2048],
    "ResNet152": [32, 64, 128, 256, 512, 1024, 2048],
}
RELEASE_URL = "https://github.com/gmberton/CosPlace/releases/download/v1.0/{backbone}_{fc_output_dim}_cosplace.pth"


class HubError(UserError, ValueError):
    """A model that is not released, weights that cannot be downloaded, or a checkpoint= without its run's args.json."""


def get_trained_model(backbone: str = "ResNet50", fc_output_dim: int = 2048, checkpoint: str = None) -> torch.nn.Module:
    """A CosPlace model in eval mode: the released weights of backbone (VGG16 or a ResNet) and fc_output_dim (the
    descriptor dimension), trained on SF-XL; or, with checkpoint (a run's folder or its best_model.pth), that run's
    model."""
    if checkpoint is not None:
        return run_model(checkpoint)
    if backbone not in AVAILABLE_TRAINED_MODELS:
        raise HubError(f"backbone={backbone!r} has no released weights: choose one of "
                       f"{', '.join(AVAILABLE_TRAINED_MODELS)}, or pass checkpoint='RUN/best_model.pth'")
    if int(fc_output_dim) not in AVAILABLE_TRAINED_MODELS[backbone]:
        raise HubError(f"fc_output_dim={fc_output_dim} is not released for {backbone}: choose one of "
                       f"{AVAILABLE_TRAINED_MODELS[backbone]}")
    url = RELEASE_URL.format(backbone=backbone, fc_output_dim=int(fc_output_dim))
    try:
        state_dict = torch.hub.load_state_dict_from_url(url, map_location="cpu")
    except OSError as error:  # URLError, a DNS failure, a full disk
        raise HubError(f"cannot download {url} ({type(error).__name__}: {error}): connect this machine to the "
                       f"internet, or put the file in {torch.hub.get_dir()}/checkpoints") from None
    model = network.GeoLocalizationNet(backbone.lower(), int(fc_output_dim), pretrained="none")
    model.load_state_dict(state_dict)
    return model.eval()


def run_model(checkpoint):
    """The model of one of our runs: the architecture flags of the args.json beside checkpoint (read as
    geolocalize.py reads them, the parser with the model flags alone), exactly the checkpoint's weights."""
    checkpoint = run_checkpoint(os.fspath(checkpoint))
    try:
        with contextlib.redirect_stderr(io.StringIO()) as said:
            args = parser.parse_arguments("geolocalize", ["--resume_model", checkpoint])
    except SystemExit:  # argparse's one-line error, printed: a HubError instead of the end of a notebook's kernel
        reason = said.getvalue().strip().split(": error: ", 1)[-1].replace(" (--help lists the flags)", "")
        raise HubError(f"checkpoint={checkpoint!r}: {reason}") from None
    model = network.GeoLocalizationNet(**parser.model_options(args))
    checkpoints.load_model_weights(model, args.resume_model)
    return model.eval()


def run_checkpoint(checkpoint):
    """The checkpoint file that checkpoint= names (a run folder: its best_model.pth, else its last_checkpoint.pth),
    once the args.json of its run is known to be there and to be JSON: a HubError naming the file otherwise."""
    if not os.path.exists(checkpoint):
        raise HubError(f"checkpoint={checkpoint!r}: no such file or folder; give a run folder of train.py "
                       f"(logs/<save_dir>/<run>) or its best_model.pth")
    folder = checkpoint if os.path.isdir(checkpoint) else os.path.dirname(os.path.abspath(checkpoint))
    args_path = os.path.join(folder, "args.json")
    if not os.path.isfile(args_path):
        raise HubError(f"{folder} has no args.json, which gives the architecture: is it a run folder of train.py? "
                       f"Give checkpoint= a run folder, or a .pth beside its args.json (for CosPlace's released "
                       f"weights, give backbone= and fc_output_dim= instead)")
    try:
        with open(args_path) as file:
            run_args = json.load(file)
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise HubError(f"{args_path} is not valid JSON ({error}): repair it, or copy the run's args.json "
                       f"again") from error
    except OSError as error:
        raise HubError(f"{args_path} cannot be read ({error})") from error
    if not isinstance(run_args, dict):
        raise HubError(f"{args_path} holds a JSON {type(run_args).__name__}, not the flags of a run: copy the "
                       f"run's args.json again")
    if os.path.isdir(checkpoint):
        inside = [os.path.join(checkpoint, name) for name in ("best_model.pth", "last_checkpoint.pth")
                  if os.path.isfile(os.path.join(checkpoint, name))]
        if not inside:
            raise HubError(f"{checkpoint} holds no best_model.pth or last_checkpoint.pth: give checkpoint= the "
                           f".pth file of the run")
        return inside[0]
    return checkpoint
