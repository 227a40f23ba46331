"""dinollama: DINOv2 and Code Llama in plain PyTorch."""

__version__ = "0.1.0"
