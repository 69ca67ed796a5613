"""The PNG encoder writes files a decoder reads back pixel for pixel."""
from __future__ import annotations

import io

import numpy as np
import pytest

from pipeline.report.png import encode_png
from renderkit import decode_png


def test_png_round_trips_every_pixel():
    rgb = np.random.default_rng(0).integers(0, 256, (7, 13, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decode_png(encode_png(rgb)), rgb)


def test_png_is_read_by_an_independent_decoder():
    from PIL import Image as image_module  # Pillow comes with the [test] extra

    rgb = np.random.default_rng(1).integers(0, 256, (5, 9, 3), dtype=np.uint8)
    with image_module.open(io.BytesIO(encode_png(rgb))) as im:
        assert im.mode == "RGB" and im.size == (9, 5)
        np.testing.assert_array_equal(np.asarray(im), rgb)


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 3), np.float32),
                                 np.zeros((0, 4, 3), np.uint8)])
def test_png_refuses_what_it_cannot_encode(bad):
    with pytest.raises(ValueError, match="encode_png"):
        encode_png(bad)
