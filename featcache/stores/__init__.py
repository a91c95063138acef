"""Cache stores: one reader/writer interface, backends chosen by name (zarr, wds, hdf5).

Importing the package registers every backend, so :func:`open_reader` and :func:`create_writer` find them by name.
"""
from . import hdf5_store, wds_store, zarr_store  # noqa: F401  (registration)
from .base import READERS, WRITERS, StoreReader, StoreWriter, create_writer, detect_format, open_reader

__all__ = ["READERS", "WRITERS", "StoreReader", "StoreWriter", "create_writer", "detect_format", "open_reader"]
