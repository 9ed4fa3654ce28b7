"""pandora-lightning: Pandora-style general world models (video state + free-text actions) on PyTorch Lightning."""

__version__ = "0.2.0"
