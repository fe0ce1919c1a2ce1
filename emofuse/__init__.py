"""emofuse: multimodal emotion recognition from cached self-supervised features."""

__version__ = "0.1.0"
