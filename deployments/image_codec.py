"""PIL image -> encoded bytes in the requested format."""

from __future__ import annotations

import io
from typing import Optional

MIME_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def encode_image(image, fmt: str, compression: Optional[int] = None, png_level: int = 6) -> bytes:
    """`compression` is OpenAI's `output_compression` (0-100, jpeg/webp only; PNG is lossless).
    As with OpenAI's API, where its default is 100, it acts as the encoder's quality setting:
    100 is the best image, lower values give smaller files. Default: quality 95. `png_level` is
    zlib's level for PNG (0-9; the server's setting, not the request's: the pixels are the same)."""
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG", compress_level=png_level)
    elif fmt in ("jpeg", "webp"):
        quality = 95 if compression is None else max(1, compression)
        image.convert("RGB").save(buf, format=fmt.upper(), quality=quality)
    else:
        raise ValueError(f"unsupported output format {fmt!r}")
    return buf.getvalue()


def encode_array(array, fmt: str) -> bytes:
    """A uint8 (h, w, 3) array, encoded."""
    from PIL import Image

    return encode_image(Image.fromarray(array), fmt)
