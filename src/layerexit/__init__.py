"""layerexit: early exiting for pretrained transformer classifiers."""

from layerexit import losses, strategies
from layerexit.errors import LayerExitError
from layerexit.model import EarlyExitModel, ExitConfig
from layerexit.predictor import Predictor
from layerexit.runtime.loop import early_exit_forward
from layerexit.version import __version__ as __version__

__all__ = [
    "EarlyExitModel",
    "ExitConfig",
    "LayerExitError",
    "Predictor",
    "early_exit_forward",
    "losses",
    "strategies",
]
