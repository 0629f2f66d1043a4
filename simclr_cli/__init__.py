"""simclr: self-supervised image encoders from folders of unlabeled images (SimCLR)."""

__version__ = "0.1.0"
