"""Image files and datasets: robust decoding, folder/list readers."""

from .images import IMAGE_EXTENSIONS, ImageLoadError, list_images, load_image

__all__ = ["IMAGE_EXTENSIONS", "ImageLoadError", "list_images", "load_image"]
