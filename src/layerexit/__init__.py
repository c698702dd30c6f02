"""layerexit: early exiting for pretrained transformer classifiers."""

from layerexit import losses, strategies
from layerexit.errors import LayerExitError
from layerexit.inference import early_exit_forward
from layerexit.model import EarlyExitModel, ExitConfig
from layerexit.predictor import Predictor

__version__ = "0.1.0"
__all__ = [
    "EarlyExitModel",
    "ExitConfig",
    "LayerExitError",
    "Predictor",
    "early_exit_forward",
    "losses",
    "strategies",
]
