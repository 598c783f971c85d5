"""torch.hub entry point, with the original CosPlace's signature, so that a course notebook works unchanged:

    model = torch.hub.load("gmberton/cosplace", "get_trained_model", backbone="ResNet50", fc_output_dim=2048)
    model = torch.hub.load(REPO_DIR, "get_trained_model", source="local", checkpoint="logs/.../best_model.pth")

The first downloads CosPlace's released weights (trained on SF-XL); the second builds a run of ours from the args.json
beside the checkpoint and loads exactly its weights. Either model is in eval mode and gives L2-normalised descriptors.
"""

dependencies = ["torch", "torchvision", "timm"]

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
    """A model that is not released, or weights that cannot be downloaded."""


def get_trained_model(backbone: str = "ResNet50", fc_output_dim: int = 2048, checkpoint: str = None) -> torch.nn.Module:
    """A CosPlace model in eval mode: the released weights of backbone (VGG16 or a ResNet) and fc_output_dim (the
    descriptor dimension), trained on SF-XL; or, with checkpoint (a run's best_model.pth), that run's model."""
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
    args = parser.parse_arguments("geolocalize", ["--resume_model", str(checkpoint)])
    model = network.GeoLocalizationNet(**parser.model_options(args))
    checkpoints.load_model_weights(model, args.resume_model)
    return model.eval()
