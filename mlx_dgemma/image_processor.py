"""Gemma 4's image processor with Pillow and NumPy (transformers' ``Gemma4ImageProcessorPil``).

An image is resized, keeping its aspect ratio, to the largest size whose sides are
multiples of ``pooling_kernel_size * patch_size`` (48 px) and whose patch count fits
``max_soft_tokens * pooling_kernel_size**2``; scaled to [0, 1] (no normalisation: the
tower maps to [-1, 1] itself); cut into ``patch_size`` squares, row-major, each flattened
(y, x, channel). Each 3 x 3 cell of patches becomes one soft token in the prompt, between
the begin- and end-of-image tokens.

Nothing is padded: the tower runs one image at a time.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
from .errors import ImageError  # noqa: F401  (raised here; defined with the others)

SUPPORTED_SOFT_TOKENS = (70, 140, 280, 560, 1120)
DEFAULT_MAX_SOFT_TOKENS = 280
# Larger images are refused before they are decoded (a decompression bomb guard).
DEFAULT_MAX_PIXELS = 50_000_000

ImageInput = Union[str, Path, bytes, "PIL.Image.Image"]  # noqa: F821


@dataclass
class ProcessedImage:
    patches: np.ndarray  # [P, 3 * patch_size**2] float32 in [0, 1]
    positions: np.ndarray  # [P, 2] int (x, y) patch coordinates
    num_soft_tokens: int
    size: tuple  # (height, width) after resizing


def target_size(height: int, width: int, patch_size: int, max_patches: int, pooling_kernel_size: int) -> tuple:
    """The reference's ``get_aspect_ratio_preserving_size``: (height, width) after resizing."""
    factor = math.sqrt(max_patches * patch_size**2 / (height * width))
    side = pooling_kernel_size * patch_size
    th = int(math.floor(factor * height / side)) * side
    tw = int(math.floor(factor * width / side)) * side
    if th == 0 and tw == 0:
        raise ImageError(f"a {width}x{height} image cannot be resized to a multiple of {side} px")
    longest = (max_patches // pooling_kernel_size**2) * side
    if th == 0:  # very wide: one row of cells
        th, tw = side, min(int(math.floor(width / height)) * side, longest)
    elif tw == 0:  # very tall
        tw, th = side, min(int(math.floor(height / width)) * side, longest)
    return th, tw


def open_image(image: ImageInput, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = None):
    """A decoded RGB PIL image from a path, bytes or a PIL image, or a one-line ImageError
    naming the input. Transparency is composited over white, as the reference does."""
    from PIL import Image, UnidentifiedImageError

    label = name or (str(image) if isinstance(image, (str, Path)) else type(image).__name__)
    if isinstance(image, Image.Image):
        img = image
    else:
        if isinstance(image, (bytes, bytearray)):
            src = io.BytesIO(image)
            label = name or f"image ({len(image)} bytes)"
        elif isinstance(image, (str, Path)):
            if not Path(image).is_file():
                raise ImageError(f"{label}: no such image file")
            src = str(image)
        else:
            raise ImageError(f"{label}: expected an image file path, bytes or a PIL image")
        try:
            with warnings.catch_warnings():  # Pillow's own bomb warning: our limit is checked below
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(src)
        except Image.DecompressionBombError:
            raise ImageError(f"{label}: too many pixels (more than Pillow's limit of "
                             f"{2 * (Image.MAX_IMAGE_PIXELS or 0):,}; ours is {max_pixels:,})") from None
        except UnidentifiedImageError:
            raise ImageError(f"{label}: not an image (Pillow cannot identify it)") from None
        except OSError as e:
            raise ImageError(f"{label}: cannot be read ({e})") from None
    w, h = img.size
    if w * h > max_pixels:
        raise ImageError(f"{label}: {w}x{h} is {w * h:,} pixels, more than the limit of {max_pixels:,}")
    if w < 1 or h < 1:
        raise ImageError(f"{label}: empty image ({w}x{h})")
    try:
        img.load()
        if "A" in img.getbands() or img.info.get("transparency") is not None:
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return img.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        raise ImageError(f"{label}: truncated or corrupt image ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def process_image(
    image: ImageInput,
    patch_size: int = 16,
    pooling_kernel_size: int = 3,
    max_soft_tokens: int = DEFAULT_MAX_SOFT_TOKENS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> ProcessedImage:
    """One image -> patches, positions and its soft-token count."""
    from PIL import Image

    if max_soft_tokens not in SUPPORTED_SOFT_TOKENS:
        raise ImageError(f"max_soft_tokens must be one of {SUPPORTED_SOFT_TOKENS}, got {max_soft_tokens}")
    img = open_image(image, max_pixels)
    max_patches = max_soft_tokens * pooling_kernel_size**2
    th, tw = target_size(img.height, img.width, patch_size, max_patches, pooling_kernel_size)
    if (th, tw) != (img.height, img.width):
        img = img.resize((tw, th), resample=Image.BICUBIC)
    pixels = (np.asarray(img).astype(np.float64) * (1 / 255)).astype(np.float32)  # [H, W, 3]
    ph, pw = th // patch_size, tw // patch_size
    # (y, py, x, px, c) -> (y, x, py, px, c): each patch flattened row by row, channels last
    patches = pixels.reshape(ph, patch_size, pw, patch_size, 3).transpose(0, 2, 1, 3, 4).reshape(ph * pw, -1)
    gx, gy = np.meshgrid(np.arange(pw), np.arange(ph), indexing="xy")
    positions = np.stack([gx, gy], -1).reshape(ph * pw, 2)
    return ProcessedImage(patches, positions, ph * pw // pooling_kernel_size**2, (th, tw))
