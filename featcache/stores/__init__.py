"""Cache stores: one reader/writer interface, backends chosen by name (zarr, wds, hdf5)."""
from .base import READERS, WRITERS, StoreReader, StoreWriter, create_writer, detect_format, open_reader

__all__ = ["READERS", "WRITERS", "StoreReader", "StoreWriter", "create_writer", "detect_format", "open_reader"]
