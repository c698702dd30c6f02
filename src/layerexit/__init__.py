"""layerexit: early exiting for pretrained transformer classifiers."""

__version__ = "0.1.0"
