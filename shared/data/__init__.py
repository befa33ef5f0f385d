"""Data: readers, discovery, partitioning, splits, phantoms, per-site loading.

Importing this package registers every built-in image reader, DICOM included.
"""

from shared.data import dicom as _dicom  # noqa: F401  (registers the .dcm/.dicom reader)
