"""torch.hub entry point, with the original CosPlace's signature, so that a course notebook works unchanged:

    model = torch.hub.load("gmberton/cosplace", "get_trained_model", backbone="ResNet50", fc_output_dim=2048)
    model = torch.hub.load(REPO_DIR, "get_trained_model", source="local", checkpoint="logs/.../best_model.pth")
    model = torch.hub.load(REPO_DIR, "get_trained_model", source="local", repo_id="user/name")

The first downloads CosPlace's released weights (trained on SF-XL); the second builds a run of ours from the args.json
beside the checkpoint and loads exactly its weights; the third does so with a folder of publish_model.py (args.json,
model.safetensors) uploaded to the Hugging Face Hub, downloaded once into its cache. Each model is in eval mode and
gives L2-normalised descriptors.
"""

dependencies = ["torch", "torchvision", "timm", "safetensors", "huggingface_hub"]

import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402

import torch  # noqa: E402
from huggingface_hub import constants as hub_constants, snapshot_download  # noqa: E402

from training import checkpoints  # noqa: E402
import parser  # noqa: E402
from core.errors import UserError  # noqa: E402
from model import network  # noqa: E402
from model.backbones import hub_offline_unless_reachable  # noqa: E402

# Backbone -> the descriptor dimensions of the released weights (upstream's AVAILABLE_TRAINED_MODELS)
AVAILABLE_TRAINED_MODELS = {
    "VGG16": [64, 128, 256, 512],
    "ResNet18": [32, 64, 128, 256, 512],
    "ResNet50": [32, 64, 128, 256, 512, 1024, 2048],
    "ResNet101": [32, 64, 128, 256, 512, 1024, 2048],
    "ResNet152": [32, 64, 128, 256, 512, 1024, 2048],
}
RELEASE_URL = "https://github.com/gmberton/CosPlace/releases/download/v1.0/{backbone}_{fc_output_dim}_cosplace.pth"
# The files of a folder of publish_model.py that make the model: the architecture and the weights
PUBLISHED_MODEL_FILES = ["args.json", "model.safetensors"]


class HubError(UserError, ValueError):
    """A model that is not released, weights that cannot be downloaded, or a checkpoint= without its run's args.json."""


def get_trained_model(backbone: str = "ResNet50", fc_output_dim: int = 2048, checkpoint: str = None,
                      repo_id: str = None) -> torch.nn.Module:
    """A CosPlace model in eval mode: the released weights of backbone (VGG16 or a ResNet) and fc_output_dim (the
    descriptor dimension), trained on SF-XL; or, with checkpoint (a run's folder or its best_model.pth, or a folder
    of publish_model.py), that run's model; or, with repo_id ('user/name'), the model that publish_model.py
    uploaded to that repository of the Hugging Face Hub."""
    if checkpoint is not None and repo_id is not None:
        raise HubError(f"checkpoint={checkpoint!r} and repo_id={repo_id!r}: give one of them")
    if repo_id is not None:
        checkpoint = download_published_model(repo_id)
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


def download_published_model(repo_id):
    """The local folder of the model that publish_model.py uploaded to repo_id, downloaded once into huggingface_hub's
    cache; from the cache at once when the Hub cannot be reached, a one-line HubError when it is not there."""
    try:
        with hub_offline_unless_reachable():
            return snapshot_download(repo_id, allow_patterns=PUBLISHED_MODEL_FILES)
    except (OSError, ValueError) as error:  # offline and not cached, no such repository, a malformed repo_id
        reason = " ".join(str(error).split()).split(". ")[0]  # the rest would suggest HF_HUB_OFFLINE=0: no help here
        raise HubError(f"cannot download repo_id={repo_id!r} from the Hugging Face Hub ({type(error).__name__}: "
                       f"{reason}): connect this machine to the internet (the model is then cached in "
                       f"{hub_constants.HF_HUB_CACHE}), check the name (a private repository needs `hf auth login` "
                       f"or HF_TOKEN), or give checkpoint= a folder of publish_model.py") from None


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
    """The checkpoint file that checkpoint= names (a folder of publish_model.py: its model.safetensors; a run folder:
    its best_model.pth, else its last_checkpoint.pth), once the args.json of its run is known to be there and to be
    JSON: a HubError naming the file otherwise."""
    if not os.path.exists(checkpoint):
        raise HubError(f"checkpoint={checkpoint!r}: no such file or folder; give a run folder of train.py "
                       f"(logs/<save_dir>/<run>) or its best_model.pth, or a folder of publish_model.py")
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
        names = ("model.safetensors", "best_model.pth", "last_checkpoint.pth")
        inside = [os.path.join(checkpoint, name) for name in names if os.path.isfile(os.path.join(checkpoint, name))]
        if not inside:
            raise HubError(f"{checkpoint} holds no model.safetensors, best_model.pth or last_checkpoint.pth: give "
                           f"checkpoint= the weights file of the run")
        return inside[0]
    return checkpoint
