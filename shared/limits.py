"""How big an input file a site will decode: the pixel cap and the file-size bound it implies.

Every image file at a hospital site is untrusted until checked. A PNG, JPEG,
TIFF or DICOM header states the image's size, and the decoder allocates that
much memory before it reads a single pixel: a 20000 x 20000 16-bit PNG of
zeros is a few hundred kilobytes on disk and 800 MB once decoded (about 12 GB
at the peak of the float pipeline), and a DICOM header claiming
60000 x 60000 pixels makes the decoder ask for 7 GB before it finds the data
missing. So the header is read first (:func:`shared.data.sources.screen_image`)
and compared with a cap; only an image under the cap is decoded.

This module holds the numbers only (no heavy imports, outside :mod:`shared.data`,
whose package import registers the readers), so that the node configuration
can name the default without importing OpenCV or pydicom.
"""

from __future__ import annotations

__all__ = ["DEFAULT_MAX_PIXELS", "FILE_BYTES_PER_PIXEL", "FILE_BYTES_SLACK", "MAX_PIXELS_LIMIT", "max_file_bytes"]

DEFAULT_MAX_PIXELS = 50_000_000
"""Default cap on width x height (x frames) of one input image: 50 megapixels.

Why 50 MP: the largest routine radiographs are well below it -- a chest CR/DR
is about 3000 x 3000 (9 MP; large DR detectors 4300 x 4300, 18.5 MP), a
mammogram about 4000 x 5000 up to 4096 x 5625 (20-23 MP) -- and so is a
photograph from a 48-megapixel phone camera (8000 x 6000) in the wound-photo
task, with room to spare. At the cap the decoded image is at most 400 MB
(4 channels x 16 bits) and the float pipeline peaks at a few GB for one
colour image, which a site machine can afford one file at a time; a
decompression bomb or a header lying about its size (hundreds of MP or more)
is refused before any allocation. A site with larger images (whole-slide
pathology is out of scope) raises it in its node config (``max-image-pixels``).
"""

MAX_PIXELS_LIMIT = 10_000_000_000
"""Upper bound a site may set the cap to (10 gigapixels): beyond it the cap means nothing."""

FILE_BYTES_PER_PIXEL = 8
"""Bytes per capped pixel an uncompressed file may need: 4 samples x 16 bits."""

FILE_BYTES_SLACK = 64 << 20
"""Room for headers, overlays, ICC profiles, DICOM private tags: 64 MiB."""


def max_file_bytes(max_pixels: int) -> int:
    """The largest file an image within ``max_pixels`` can plausibly need.

    Decoders read the whole file into memory first (OpenCV decodes from a byte
    buffer; pydicom reads the pixel data element), so a file far larger than
    any image under the cap is refused too, before it is read: uncompressed
    pixels at :data:`FILE_BYTES_PER_PIXEL` plus :data:`FILE_BYTES_SLACK`.

    Parameters
    ----------
    max_pixels : int
        The pixel cap.

    Returns
    -------
    int
        A byte count (464 MiB for the default 50 MP cap).
    """
    return int(max_pixels) * FILE_BYTES_PER_PIXEL + FILE_BYTES_SLACK
