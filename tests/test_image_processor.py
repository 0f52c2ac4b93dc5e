"""The image processor against transformers' Gemma4ImageProcessorPil (Pillow + NumPy).

Images are generated here (no files downloaded): different sizes and aspect ratios,
grey and RGBA inputs, one already at a target size (no resize), an extreme panorama
(one row of cells). Patches, positions and soft-token counts must be equal.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from mlx_dgemma.image_processor import ImageError, process_image

IP = pytest.importorskip("transformers.models.gemma4.image_processing_pil_gemma4")


def picture(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Smooth gradients plus noise: resampling differences would show."""
    rs = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    chans = [(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), ((xx + yy) * 7) % 256]
    arr = np.stack(chans, -1).astype(np.int32) + rs.randint(-20, 21, (h, w, 3))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    if mode == "RGBA":
        alpha = Image.fromarray((rs.rand(h, w) * 255).astype(np.uint8), "L")
        img.putalpha(alpha)
    elif mode != "RGB":
        img = img.convert(mode)
    return img


CASES = [
    ("landscape", picture(640, 480)),
    ("portrait", picture(300, 900, seed=1)),
    ("small_upscaled", picture(50, 70, seed=2)),
    ("exact_target", picture(864, 768, seed=3)),  # already 16 x 18 cells of 48 px: no resize
    ("panorama", picture(3000, 12, seed=4)),  # rounds to 0 rows: one row of cells
    ("grey", picture(333, 222, "L", seed=5)),
    ("rgba", picture(200, 260, "RGBA", seed=6)),
]


@pytest.mark.parametrize("max_soft_tokens", [280, 70])
@pytest.mark.parametrize("name,img", CASES, ids=[c[0] for c in CASES])
def test_equal_to_transformers(name, img, max_soft_tokens):
    ref = IP.Gemma4ImageProcessorPil(max_soft_tokens=max_soft_tokens)(img, return_tensors="np")
    ours = process_image(img, max_soft_tokens=max_soft_tokens)
    n = len(ours.patches)
    assert ours.num_soft_tokens == ref["num_soft_tokens_per_image"][0] == n // 9
    pos = ref["image_position_ids"][0]
    assert (pos[n:] == -1).all() and (pos[:n] >= 0).all()  # the reference pads, we do not
    np.testing.assert_array_equal(ours.positions, pos[:n])
    np.testing.assert_array_equal(ours.patches, ref["pixel_values"][0][:n])


def test_same_from_path_bytes_and_pil(tmp_path):
    img = picture(123, 77, seed=9)
    f = tmp_path / "x.png"
    img.save(f)
    a, b, c = process_image(img), process_image(f), process_image(f.read_bytes())
    np.testing.assert_array_equal(a.patches, b.patches)
    np.testing.assert_array_equal(a.patches, c.patches)


def test_bad_images(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image at all")
    with pytest.raises(ImageError, match="notes.png: not an image"):
        process_image(text)
    buf = io.BytesIO()
    picture(400, 300).save(buf, "PNG")
    cut = tmp_path / "cut.png"
    cut.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match="cut.png: truncated"):
        process_image(cut)
    with pytest.raises(ImageError, match="120,000 pixels, more than the limit of 100,000"):
        process_image(picture(400, 300), max_pixels=100_000)
    with pytest.raises(ImageError, match="no such image file"):
        process_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="max_soft_tokens"):
        process_image(picture(10, 10), max_soft_tokens=100)


def png_header(width: int, height: int) -> bytes:
    """A PNG with only a header (no pixel data): its size is read without decoding."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.mark.parametrize("w,h", [(9000, 8000), (20000, 10000)])  # past our limit; past Pillow's bomb limit too
def test_huge_images_are_refused_before_decoding(w, h):
    with pytest.raises(ImageError, match="pixels"):
        process_image(png_header(w, h))
