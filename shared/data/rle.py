"""Run-length-encoded masks in the SIIM-ACR pneumothorax convention.

The SIIM-ACR challenge gives masks as CSV rows ``ImageId, EncodedPixels``:

* the mask is flattened **column-major** (down the first column, then the
  next: the transpose of numpy's row order), at the image's own size;
* ``EncodedPixels`` is ``start length start length ...`` where each
  ``start`` is *relative*: the number of background pixels since the end of
  the previous run (the first one counts from pixel 0);
* ``-1`` (or an empty field) is an empty mask; several rows with the same
  ``ImageId`` are separate regions whose union is the mask.

Example (5 x 5, hand-checked in ``tests/test_rle.py``): foreground at rows
1-2 of column 0, all of column 2 and row 4 of column 4 is ``"1 2 7 5 9 1"``
(absolute column-major starts 1, 10, 24).
"""

from __future__ import annotations

import numpy as np

__all__ = ["EMPTY_RLE", "rle_decode", "rle_encode"]

EMPTY_RLE = "-1"
"""``EncodedPixels`` of an empty mask."""


def rle_encode(mask: np.ndarray) -> str:
    """Encode a 2-D mask (nonzero = foreground) as SIIM-ACR relative RLE.

    Returns
    -------
    str
        ``"start length ..."`` with relative starts on the column-major
        flattened mask, or :data:`EMPTY_RLE` for an empty mask.

    Raises
    ------
    ValueError
        ``mask`` is not 2-D.
    """
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"rle_encode expects a 2-D mask (H, W), got shape {m.shape}")
    flat = np.concatenate([[False], (m != 0).T.ravel(), [False]])
    edges = np.flatnonzero(flat[1:] != flat[:-1])
    starts, ends = edges[0::2], edges[1::2]
    if starts.size == 0:
        return EMPTY_RLE
    previous_end = np.concatenate([[0], ends[:-1]])
    pairs = np.stack([starts - previous_end, ends - starts], axis=1).ravel()
    return " ".join(str(int(v)) for v in pairs)


def rle_decode(rle: str, height: int, width: int) -> np.ndarray:
    """Decode SIIM-ACR relative RLE into a ``bool`` mask of shape ``(height, width)``.

    Parameters
    ----------
    rle : str
        ``EncodedPixels``: ``"start length ..."`` (relative starts,
        column-major), ``"-1"`` or empty for an empty mask.
    height, width : int
        Size of the image the mask belongs to.

    Raises
    ------
    ValueError
        Tokens that are not integers, an odd count, negative starts,
        lengths < 1, or runs beyond the image; the message says which.
    """
    if height < 1 or width < 1:
        raise ValueError(f"rle_decode needs a positive height and width, got {height} x {width}")
    text = (rle or "").strip()
    out = np.zeros(height * width, dtype=bool)
    if text in ("", EMPTY_RLE):
        return out.reshape(height, width)
    try:
        values = np.array([int(t) for t in text.split()], dtype=np.int64)
    except ValueError:
        raise ValueError(
            f"run-length mask must be integers 'start length ...' or '-1', got {text[:40]!r}"
        ) from None
    if values.size % 2:
        raise ValueError(f"run-length mask has an odd number of values ({values.size}): expected 'start length' pairs")
    starts, lengths = values[0::2], values[1::2]
    if (starts < 0).any() or (lengths < 1).any():
        raise ValueError("run-length mask: relative starts must be >= 0 and lengths >= 1")
    absolute = np.cumsum(starts + np.concatenate([[0], lengths[:-1]]))
    if int(absolute[-1] + lengths[-1]) > out.size:
        raise ValueError(
            f"run-length mask runs to pixel {int(absolute[-1] + lengths[-1])} but the image has only "
            f"{height} x {width} = {out.size} pixels: is it the mask of another image size?"
        )
    for s, n in zip(absolute.tolist(), lengths.tolist(), strict=True):
        out[s : s + n] = True
    return out.reshape(width, height).T.copy()
