"""Built-in datasets, users' COCO-format datasets, the image reader and data-loading helpers."""
from .builtin import register_shapes, shapes_image_glob
from .image_io import ImageReadError, read_image
from .mapper import CheckedDatasetMapper, build_train_mapper
from .user_datasets import dataset_classes, register_coco_instances, register_datasets

__all__ = ["CheckedDatasetMapper", "ImageReadError", "build_train_mapper", "dataset_classes",
           "read_image", "register_coco_instances", "register_datasets", "register_shapes",
           "shapes_image_glob"]
