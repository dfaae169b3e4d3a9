"""Which geometry an image processor applies, read from its settings, or a refusal."""

import pytest
from transformers import CLIPImageProcessor

from mmlens.core.errors import MMLensError
from mmlens.inputs.geometry import preprocess_transform
from mmlens.inputs.preprocessing import check_preprocessing, processor_geometry


class _Processor:
    def __init__(self, **settings):
        self.image_processor = CLIPImageProcessor(**settings)


@pytest.mark.parametrize("settings, expected", [
    (dict(size={"shortest_edge": 336}, crop_size=336), "resize_crop"),
    (dict(size={"height": 336, "width": 336}, do_center_crop=False), "resize"),
    (dict(size={"height": 336, "width": 336}, crop_size=336), "resize"),  # crop of nothing
])
def test_known_geometries(settings, expected):
    assert processor_geometry(CLIPImageProcessor(**settings), 336) == expected


@pytest.mark.parametrize("settings", [
    dict(size={"shortest_edge": 384}, crop_size=336),  # resize past the crop
    dict(size={"shortest_edge": 336}, do_center_crop=False),  # non-square output
    dict(size={"shortest_edge": 336}, crop_size=336, do_resize=False),
])
def test_unknown_geometries_are_refused(settings):
    with pytest.raises(MMLensError, match="cannot map object boxes through this image processor"):
        processor_geometry(CLIPImageProcessor(**settings), 336)


def test_a_processor_that_pads_itself_is_mapped_as_pad():
    image_processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size=336)
    image_processor.do_pad = True
    assert processor_geometry(image_processor, 336) == "pad"


def test_requested_mode_must_match_the_processor():
    crop = _Processor(size={"shortest_edge": 336}, crop_size=336)
    assert check_preprocessing(crop, None, 336) == "resize_crop"
    assert check_preprocessing(crop, "pad", 336) == "pad"  # mmlens pads; the processor resizes
    with pytest.raises(MMLensError, match="preprocessing='resize' was asked for, but the model's "
                       "processor does 'resize_crop'"):
        check_preprocessing(crop, "resize", 336)
    with pytest.raises(MMLensError, match="unknown preprocessing mode 'stretch'"):
        check_preprocessing(crop, "stretch", 336)


def test_plain_resize_scales_each_axis_on_its_own():
    scale, shift = preprocess_transform((672, 336), 336, "resize")
    assert scale == (0.5, 1) and shift == (0, 0)
