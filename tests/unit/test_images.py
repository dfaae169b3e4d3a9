"""Every kind of image reaches the processor as 8-bit RGB with its values scaled, not clipped."""

import numpy as np
import pytest
import torch
from PIL import Image

from mmlens.core.errors import MMLensError
from mmlens.core.images import to_rgb
from mmlens.data.example import Example

GRADIENT = np.linspace(0, 1, 16 * 8).reshape(8, 16)  # 8 rows x 16 columns, 0..1
EXPECTED = np.repeat(np.round(GRADIENT * 255).astype(np.uint8)[:, :, None], 3, axis=2)


def _pixels(image):
    assert image.mode == "RGB"
    return np.asarray(image)


def test_rgb_passes_unchanged():
    image = Image.fromarray(EXPECTED)
    assert np.array_equal(_pixels(to_rgb(image)), EXPECTED)


def test_16_bit_image_is_scaled_not_clipped():
    values = np.round(GRADIENT * 65535).astype(np.uint16)
    image = Image.fromarray(values)
    assert image.mode.startswith("I;16")
    assert np.abs(_pixels(to_rgb(image)).astype(int) - EXPECTED).max() <= 1
    # what convert("RGB") does: nearly everything clipped to white
    assert (np.asarray(image.convert("RGB")) == 255).mean() > 0.9


def test_32_bit_integer_image_is_read_as_16_bit():
    image = Image.fromarray(np.round(GRADIENT * 65535).astype(np.int32))
    assert image.mode == "I"
    assert np.abs(_pixels(to_rgb(image)).astype(int) - EXPECTED).max() <= 1


def test_32_bit_integer_image_outside_16_bits_is_refused():
    image = Image.fromarray(np.full((4, 4), 70000, dtype=np.int32))
    with pytest.raises(MMLensError, match=r"32-bit integer image with values 70000..70000.*"
                       r"scale it"):
        to_rgb(image, source="big.png")


def test_float_image_in_unit_range_is_scaled():
    image = Image.fromarray(GRADIENT.astype(np.float32))
    assert image.mode == "F"
    assert np.abs(_pixels(to_rgb(image)).astype(int) - EXPECTED).max() <= 1
    assert np.asarray(image.convert("RGB")).max() <= 1  # what convert("RGB") does: black


def test_float_image_outside_unit_range_is_refused():
    image = Image.fromarray((GRADIENT * 255).astype(np.float32))
    with pytest.raises(MMLensError, match=r"float image \(scan.tif\) has values 0..255; float "
                       r"images must lie in \[0, 1\] \(divide by 255\?\)"):
        to_rgb(image, source="scan.tif")


def test_palette_image_keeps_its_colours():
    image = Image.fromarray(EXPECTED).convert("P", palette=Image.Palette.ADAPTIVE, colors=256)
    assert np.abs(_pixels(to_rgb(image)).astype(int) - EXPECTED).max() <= 8


def test_transparency_is_composited_on_white():
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[0, 1] = (0, 0, 0, 0)  # transparent (black underneath)
    rgba[1, 0] = (0, 0, 255, 128)  # half blue
    rgb = _pixels(to_rgb(Image.fromarray(rgba)))
    assert rgb[0, 0].tolist() == [255, 0, 0]
    assert rgb[0, 1].tolist() == [255, 255, 255]
    assert np.abs(rgb[1, 0].astype(int) - [127, 127, 255]).max() <= 1
    la = Image.merge("LA", [Image.fromarray(rgba[:, :, 0]), Image.fromarray(rgba[:, :, 3])])
    assert _pixels(to_rgb(la))[0, 1].tolist() == [255, 255, 255]
    palette = Image.fromarray(rgba).convert("P")
    palette.info["transparency"] = palette.getpixel((1, 0))
    assert _pixels(to_rgb(palette))[0, 1].tolist() == [255, 255, 255]


def test_cmyk_and_one_bit():
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # full magenta + yellow = red
    assert _pixels(to_rgb(cmyk))[0, 0].tolist() == [255, 0, 0]
    bits = Image.fromarray(np.array([[0, 1], [1, 0]], dtype=bool))
    assert bits.mode == "1"
    assert _pixels(to_rgb(bits))[:, :, 0].tolist() == [[0, 255], [255, 0]]


@pytest.mark.parametrize("array", [
    EXPECTED,  # uint8 HxWx3
    GRADIENT,  # float HxW in [0, 1]
    GRADIENT.astype(np.float32)[:, :, None].repeat(3, axis=2),
    np.round(GRADIENT * 65535).astype(np.uint16),  # uint16
])
def test_numpy_arrays(array):
    assert np.abs(_pixels(to_rgb(array)).astype(int) - EXPECTED).max() <= 1


def test_torch_tensors_chw_and_hwc():
    chw = torch.from_numpy(GRADIENT).float()[None].repeat(3, 1, 1)
    assert np.abs(_pixels(to_rgb(chw)).astype(int) - EXPECTED).max() <= 1
    hwc = torch.from_numpy(EXPECTED)
    assert np.array_equal(_pixels(to_rgb(hwc)), EXPECTED)
    assert np.abs(_pixels(to_rgb(chw.half())).astype(int) - EXPECTED).max() <= 1


@pytest.mark.parametrize("bad, message", [
    (GRADIENT * 2, r"has values 0..2; float images must lie in \[0, 1\]"),
    (np.full((2, 2), np.nan), "NaN or infinite"),
    (np.zeros((2, 2), dtype=np.int64), "dtype int64: give uint8"),
    (np.zeros((2, 4, 4, 3), dtype=np.uint8), r"shape \(2, 4, 4, 3\): give one image"),
    ("photo.jpg", "is a str: give a PIL image"),
])
def test_unconvertible_arrays_are_refused(bad, message):
    with pytest.raises(MMLensError, match=message):
        to_rgb(bad, source="example 'q1'")


def test_example_image_is_converted_with_scaling(tmp_path):
    path = tmp_path / "depth.png"
    Image.fromarray(np.round(GRADIENT * 65535).astype(np.uint16)).save(path)
    example = Example("q1", "What?", "yes", "QueryAttr", "depth", image_path=path)
    assert np.abs(_pixels(example.load_image()).astype(int) - EXPECTED).max() <= 1


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_of_a_file_is_applied_and_kept(tmp_path, orientation):
    upright = np.zeros((8, 16, 3), dtype=np.uint8)  # 16 wide, 8 tall, a red block top left
    upright[:2, :4] = (255, 0, 0)
    # what a camera stores: the upright picture undone by the transpose its tag names
    undo = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90,
            8: Image.Transpose.ROTATE_270}[orientation]
    stored = Image.fromarray(upright).transpose(undo)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "photo.png"
    stored.save(path, exif=exif)
    example = Example("q1", "?", "a", "ChooseAttr", "1", image_path=path)
    loaded = example.load_image()
    assert loaded.size == (16, 8)
    assert np.array_equal(np.asarray(loaded), upright)
    assert example.exif_orientation == orientation
    plain = tmp_path / "plain.png"
    Image.fromarray(upright).save(plain)
    untagged = Example("q2", "?", "a", "ChooseAttr", "2", image_path=plain)
    assert np.array_equal(np.asarray(untagged.load_image()), upright)
    assert untagged.exif_orientation is None
