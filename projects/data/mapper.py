"""`DatasetMapper` that turns unreadable images into errors naming the file."""
from detectron2.data import DatasetMapper

from rdsnet.data import RDSNetDatasetMapper

__all__ = ["CheckedDatasetMapper", "build_train_mapper"]


class CheckedDatasetMapper(DatasetMapper):
    """Detectron2's `DatasetMapper`; a missing or corrupt image raises an error that names the
    file and its dataset record instead of a bare decoder error from a loader worker."""

    def __call__(self, dataset_dict):
        try:
            return super().__call__(dataset_dict)
        except (OSError, SyntaxError, ValueError) as e:
            file_name = dataset_dict.get("file_name", "<no file_name>")
            if isinstance(e, ValueError) and "image" not in str(e).lower():
                raise
            raise type(e)(
                f"cannot read image {file_name!r} (image_id={dataset_dict.get('image_id')}): {e}"
            ) from e


class _CheckedRDSNetDatasetMapper(CheckedDatasetMapper, RDSNetDatasetMapper):
    """`CheckedDatasetMapper` with RDSNet's GT boxes of the authors' "+1" pipeline."""


def build_train_mapper(cfg):
    """The training mapper for ``cfg``: `CheckedDatasetMapper`, or for RDSNet with
    ``MODEL.RDSNET.BOX_PLUS_ONE`` its variant that converts GT boxes as the authors' pipeline."""
    if cfg.MODEL.META_ARCHITECTURE == "RDSNet" and cfg.MODEL.RDSNET.BOX_PLUS_ONE:
        return _CheckedRDSNetDatasetMapper(cfg, True)
    return CheckedDatasetMapper(cfg, True)
