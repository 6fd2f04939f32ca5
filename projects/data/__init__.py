"""Built-in datasets and data-loading helpers."""
from .builtin import register_shapes, shapes_image_glob
from .mapper import CheckedDatasetMapper

__all__ = ["CheckedDatasetMapper", "register_shapes", "shapes_image_glob"]
