"""Built-in datasets and data-loading helpers."""
from .builtin import register_shapes, shapes_image_glob
from .mapper import CheckedDatasetMapper, build_train_mapper

__all__ = ["CheckedDatasetMapper", "build_train_mapper", "register_shapes", "shapes_image_glob"]
