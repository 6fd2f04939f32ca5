"""The project's image reader (`projects.data.read_image`), used by training, evaluation, the
demo and `DefaultPredictor` scripts: expected pixels computed by hand in each test."""
import io

import cv2
import numpy as np
import pytest
from PIL import Image

from projects.data import CheckedDatasetMapper, ImageReadError, read_image

from .conftest import QUICKSTART


def test_16bit_gray_is_scaled_not_clipped(tmp_path):
    # a horizontal ramp over the whole 16-bit range: 0, 1040, ..., 65520
    ramp = (np.arange(64, dtype=np.uint16) * 1040)[None].repeat(16, 0)
    path = str(tmp_path / "gray16.png")
    assert cv2.imwrite(path, ramp)
    assert Image.open(path).mode.startswith("I")  # really a 16-bit file
    img = read_image(path, "BGR")
    expected = np.rint(ramp.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert img.shape == (16, 64, 3) and img.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(img[..., c], expected)
    # contrast kept: 64 distinct levels from 0 to 255 (clipping gave 255 for all but one column)
    assert img.min() == 0 and img.max() == 255 and len(np.unique(img)) == 64
    assert read_image(path, "L")[..., 0].tolist() == expected.tolist()


def test_8bit_gray_and_palette_with_transparency(tmp_path):
    gray = np.arange(0, 250, 10, dtype=np.uint8).reshape(5, 5)
    Image.fromarray(gray, "L").save(tmp_path / "gray.png")
    rgb = read_image(str(tmp_path / "gray.png"), "RGB")
    assert (rgb == gray[..., None]).all()

    pal = Image.new("P", (4, 2))
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    pal.putdata([0, 1, 1, 0, 1, 1, 0, 0])
    pal.info["transparency"] = 0  # palette entry 0 transparent
    pal.save(tmp_path / "pal.png", transparency=0)
    out = read_image(str(tmp_path / "pal.png"), "RGB")
    white, colour = [255, 255, 255], [200, 100, 50]
    assert out[0].tolist() == [white, colour, colour, white]
    assert out[1].tolist() == [colour, colour, white, white]


def test_rgba_is_composited_over_white(tmp_path):
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (200, 100, 50, 255)
    rgba[0, 1] = (200, 100, 50, 128)
    rgba[1, 0] = (0, 0, 0, 0)
    rgba[1, 1] = (10, 250, 90, 64)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    out = read_image(str(tmp_path / "rgba.png"), "RGB").astype(int)
    a = rgba[..., 3:].astype(float) / 255
    expected = rgba[..., :3] * a + 255 * (1 - a)  # "over" a white background
    assert np.abs(out - expected).max() <= 1
    assert out[1, 0].tolist() == [255, 255, 255]


def test_cmyk_jpeg(tmp_path):
    # CMYK (0, 255, 255, 0) is pure red; (0, 0, 0, 255) black; (255, 0, 0, 0) cyan
    cmyk = Image.new("CMYK", (24, 8))
    for x in range(24):
        for y in range(8):
            cmyk.putpixel((x, y), [(0, 255, 255, 0), (0, 0, 0, 255), (255, 0, 0, 0)][x // 8])
    cmyk.save(tmp_path / "cmyk.jpg", quality=100)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    bgr = read_image(str(tmp_path / "cmyk.jpg"), "BGR").astype(int)
    for block, expected in zip(range(3), [(0, 0, 255), (0, 0, 0), (255, 255, 0)]):
        centre = bgr[4, block * 8 + 4]
        assert np.abs(centre - np.array(expected)).max() <= 8, (block, centre)


def test_exif_rotation_is_applied(tmp_path):
    # stored 20 (h) x 40 (w) with a white block at its top-left; EXIF orientation 6 means
    # "rotate 90 degrees clockwise to display": shown 40 x 20 with the block at the top-right
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:6, :6] = 255
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=100)
    out = read_image(str(tmp_path / "rotated.jpg"), "RGB")
    assert out.shape == (40, 20, 3)
    assert out[:6, -6:].mean() > 200 and out[-6:, :6].mean() < 50 and out[:6, :6].mean() < 50


def test_unreadable_files_are_errors_naming_them(tmp_path):
    good = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(good, "PNG")
    (tmp_path / "truncated.png").write_bytes(good.getvalue()[:60])
    (tmp_path / "text.jpg").write_text("not an image")
    for name in ("truncated.png", "text.jpg", "missing.png"):
        with pytest.raises(ImageReadError, match=name):
            read_image(str(tmp_path / name))


def test_training_and_evaluation_loaders_read_16bit_images_scaled(tmp_path):
    import projects

    ramp = (np.arange(64, dtype=np.uint16) * 1040)[None].repeat(64, 0)
    path = str(tmp_path / "gray16.png")
    cv2.imwrite(path, ramp)
    cfg = projects.load_config(QUICKSTART, ["INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST",
                                            "64", "MODEL.DEVICE", "cpu"])
    record = {"file_name": path, "image_id": 1, "height": 64, "width": 64, "annotations": []}
    image = CheckedDatasetMapper(cfg, is_train=False)(record)["image"]  # CHW, 64x64 kept
    expected_mean = (ramp.astype(float) * 255 / 65535).mean()  # 126.5; clipped read: 251
    assert image.shape[1:] == (64, 64)
    assert abs(float(image.float().mean()) - expected_mean) < 1.0
    # Detectron2's own reader keeps working unchanged outside the project's mapper
    from detectron2.data.detection_utils import read_image as d2_read_image

    assert d2_read_image(path, format="L").max() == 255
