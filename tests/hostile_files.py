"""Builders of hostile input files for tests: huge images written without allocating them.

``write_zero_png`` writes a valid grayscale PNG of zeros of any size in
O(one band of rows) memory: the IDAT's deflate stream is one compressed band
(ending in a full flush, so that it is byte-aligned and self-contained)
repeated, a final block for the remaining rows, and the Adler-32 of the whole
(uncompressed) image computed band by band. ``write_dicom_claiming`` writes a
DICOM file whose header states any Rows x Columns with a few bytes of pixel data.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
_BAND_BYTES = 4 << 20


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_zero_png(path: Path, width: int, height: int, bit_depth: int = 16, band_bytes: int = _BAND_BYTES) -> Path:
    """A valid ``width`` x ``height`` grayscale PNG of zeros, built in memory of about ``band_bytes``."""
    row = 1 + width * bit_depth // 8  # filter byte (0 = none) + samples
    rows_per_band = max(1, band_bytes // row)
    full, rest = divmod(height, rows_per_band)
    band = bytes(row * rows_per_band)
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = comp.compress(band) + comp.flush(zlib.Z_FULL_FLUSH)  # byte-aligned, no back-references out of it
    adler = 1
    for _ in range(full):
        adler = zlib.adler32(band, adler)
    tail = bytes(row * rest)
    last = zlib.compressobj(9, zlib.DEFLATED, -15)
    final = last.compress(tail) + last.flush(zlib.Z_FINISH)  # BFINAL block
    adler = zlib.adler32(tail, adler)
    idat = b"\x78\xda" + block * full + final + struct.pack(">I", adler & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))
    return path


def write_dicom(path: Path, image: np.ndarray) -> Path:
    """A 16-bit MONOCHROME2 CR file holding ``image``."""
    ds = _dataset()
    ds.Rows, ds.Columns = image.shape
    ds.PixelData = image.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_dicom_claiming(path: Path, rows: int, columns: int, pixel_bytes: int = 64) -> Path:
    """A DICOM file whose header states ``rows`` x ``columns`` 16-bit pixels but holds only ``pixel_bytes``."""
    ds = _dataset()
    ds.Rows, ds.Columns = rows, columns
    ds.PixelData = bytes(pixel_bytes)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _dataset() -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CR_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    return ds

