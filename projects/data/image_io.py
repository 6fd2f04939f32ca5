"""Reading the images users have: 8/16-bit, gray, RGBA, palette, EXIF-rotated, CMYK.

`read_image` is the one image reader of the project: the data loaders of training and
evaluation (`CheckedDatasetMapper`), `tools/demo.py`, `tools/visualize_data.py` and scripts
that feed `DefaultPredictor` (see the README) all use it, so a model sees the same pixels
everywhere. It differs from Detectron2's `detection_utils.read_image` only where that one
loses information:

* 16-bit (and 32-bit integer) images are scaled to 8 bits (``v * 255 / 65535``) instead of
  being clipped at 255, which saturates almost every pixel;
* float images in [0, 1] are scaled by 255, other float images by their bit range;
* transparency (RGBA, LA, palette with a transparent colour) is composited over white
  instead of the colour channels under it being used as they are;
* any file it cannot decode is an `ImageReadError` (an `OSError`) naming the file.

EXIF orientation is applied (Detectron2's ``_apply_exif_orientation``), CMYK JPEGs (also
Adobe's inverted ones) are converted to RGB by Pillow, and the result is converted to the
requested format with Detectron2's `convert_PIL_to_numpy` ("BGR", "RGB", "L", "YUV-BT.601").
"""
import numpy as np
from PIL import Image

__all__ = ["ImageReadError", "read_image", "to_8bit_pil"]

# Pillow modes that hold one channel of more than 8 bits.
_WIDE_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


class ImageReadError(OSError):
    """An image file that does not exist or cannot be decoded; the message names the file."""


def _scale_to_uint8(array: np.ndarray, mode: str, file_name: str) -> np.ndarray:
    """A >8-bit single-channel image scaled (not clipped) to uint8."""
    if mode == "F":
        finite = array[np.isfinite(array)]
        top = float(finite.max()) if finite.size else 0.0
        if float(finite.min() if finite.size else 0.0) < 0:
            raise ImageReadError(f"cannot read image {file_name!r}: float image with negative "
                                 "values (only [0, 1], 8- or 16-bit ranges are supported)")
        full = 1.0 if top <= 1.0 else 255.0 if top <= 255.0 else 65535.0
    else:
        if array.size and (int(array.min()) < 0 or int(array.max()) > 65535):
            raise ImageReadError(
                f"cannot read image {file_name!r}: {mode} image with values outside 0..65535 "
                "(only 8- and 16-bit integer images are supported)")
        full = 65535.0
    scaled = np.nan_to_num(array.astype(np.float64)) * (255.0 / full)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def to_8bit_pil(image: Image.Image, file_name: str = "<image>") -> Image.Image:
    """``image`` as an 8-bit Pillow image of mode "L" (gray sources) or "RGB" (the rest).

    16/32-bit gray is scaled to 8 bits, transparency composited over white, palette and CMYK
    images converted to RGB.
    """
    mode = image.mode
    if mode in _WIDE_GRAY_MODES:
        return Image.fromarray(_scale_to_uint8(np.asarray(image), mode, file_name), mode="L")
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode == "PA":
        image = image.convert("RGBA")
    elif mode in ("1", "L"):
        return image.convert("L")
    if image.mode in ("RGBA", "LA", "RGBa", "La"):
        gray = image.mode in ("LA", "La")
        rgba = image.convert("RGBA")  # also un-premultiplies RGBa / La
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        flat = Image.alpha_composite(white, rgba).convert("RGB")
        return flat.convert("L") if gray else flat
    if image.mode != "RGB":
        image = image.convert("RGB")  # CMYK, YCbCr, LAB, HSV, ...
    return image


def read_image(file_name: str, format: str = "BGR") -> np.ndarray:
    """Read ``file_name`` as an HxWxC uint8 array in ``format`` (Detectron2's formats: "BGR",
    "RGB", "L", or float "YUV-BT.601"), EXIF orientation applied.

    Raises:
        ImageReadError: the file is missing or cannot be decoded (message names the file).
    """
    from detectron2.data import detection_utils
    from detectron2.utils.file_io import PathManager

    apply_exif = getattr(detection_utils, "_apply_exif_orientation", None)
    if apply_exif is None:  # not a public Detectron2 API: Pillow's equivalent
        from PIL import ImageOps

        apply_exif = ImageOps.exif_transpose

    try:
        with PathManager.open(file_name, "rb") as f:
            image = Image.open(f)
            image.load()  # decode now: truncated or corrupt data fails here, inside the try
        image = apply_exif(image)
        image = to_8bit_pil(image, str(file_name))
    except ImageReadError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageReadError(
            f"cannot read image {str(file_name)!r}: {type(e).__name__}: {e}") from e
    return detection_utils.convert_PIL_to_numpy(image, format)
