"""`DatasetMapper` that reads images with the project's reader, turns unreadable images into
errors naming the file, and drops degenerate polygons."""
import contextvars
import logging

from detectron2.data import DatasetMapper
from detectron2.data import detection_utils
from detectron2.utils.logger import log_first_n
from rdsnet.data import RDSNetDatasetMapper

from .annotations import clean_segmentation
from .image_io import read_image

__all__ = ["CheckedDatasetMapper", "build_train_mapper"]

# The file `CheckedDatasetMapper.__call__` is mapping right now (per thread / task).
_MAPPING = contextvars.ContextVar("projects_data_mapping", default=None)


def _install_reader_hook():
    """Route the image read of `DatasetMapper.__call__` to `read_image` while a
    `CheckedDatasetMapper` maps that file.

    `DatasetMapper.__call__` reads with ``detection_utils.read_image(file_name, format)`` and
    has no hook for another reader; this wraps that function once so that, only for the image
    of the record being mapped by a `CheckedDatasetMapper` (a context variable), the project's
    reader answers. Every other call (other mappers, semantic-segmentation label files) gets
    Detectron2's reader unchanged.
    """
    original = detection_utils.read_image
    if getattr(original, "_projects_hook", False):
        return

    def hooked_read_image(file_name, format=None):
        if _MAPPING.get() is not None and file_name == _MAPPING.get():
            return read_image(file_name, format=format)
        return original(file_name, format=format)

    hooked_read_image._projects_hook = True
    hooked_read_image.__doc__ = original.__doc__
    detection_utils.read_image = hooked_read_image


_install_reader_hook()


def _drop_degenerate_polygons(annotations):
    kept, dropped = [], 0
    for ann in annotations:
        segm, n = clean_segmentation(ann.get("segmentation"))
        dropped += n
        if not n:
            kept.append(ann)
        elif segm:
            kept.append({**ann, "segmentation": segm})
    return kept, dropped


class CheckedDatasetMapper(DatasetMapper):
    """Detectron2's `DatasetMapper` with three differences:

    * the image is read with `projects.data.read_image` (16-bit scaled, transparency
      composited, EXIF applied, ...);
    * a missing or corrupt image raises an error that names the file and its dataset record
      instead of a bare decoder error from a loader worker;
    * in training, degenerate polygons (fewer than 3 points, zero area) are dropped, and
      annotations left without a polygon (`projects.data.annotations`), the rule evaluation
      applies to the ground truth too.
    """

    def __call__(self, dataset_dict):
        file_name = dataset_dict.get("file_name", "<no file_name>")
        if self.is_train and dataset_dict.get("annotations"):
            annotations, dropped = _drop_degenerate_polygons(dataset_dict["annotations"])
            if dropped:
                log_first_n(logging.WARNING,
                            f"{file_name}: dropped {dropped} degenerate polygon(s) (fewer than "
                            "3 points or zero area); further images are not reported",
                            n=1, name=__name__)
                dataset_dict = {**dataset_dict, "annotations": annotations}
        token = _MAPPING.set(file_name)
        try:
            return super().__call__(dataset_dict)
        except (OSError, SyntaxError, ValueError) as e:
            if isinstance(e, ValueError) and "image" not in str(e).lower():
                raise
            if file_name in str(e):
                raise
            raise type(e)(
                f"cannot read image {file_name!r} (image_id={dataset_dict.get('image_id')}): {e}"
            ) from e
        finally:
            _MAPPING.reset(token)


class _CheckedRDSNetDatasetMapper(CheckedDatasetMapper, RDSNetDatasetMapper):
    """`CheckedDatasetMapper` with RDSNet's GT boxes of the authors' "+1" pipeline."""


def build_train_mapper(cfg):
    """The training mapper for ``cfg``: `CheckedDatasetMapper`, or for RDSNet with
    ``MODEL.RDSNET.BOX_PLUS_ONE`` its variant that converts GT boxes as the authors' pipeline."""
    if cfg.MODEL.META_ARCHITECTURE == "RDSNet" and cfg.MODEL.RDSNET.BOX_PLUS_ONE:
        return _CheckedRDSNetDatasetMapper(cfg, True)
    return CheckedDatasetMapper(cfg, True)
