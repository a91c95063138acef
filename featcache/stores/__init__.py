"""Cache stores: one reader/writer protocol, backends chosen by name (zarr, wds, hdf5)."""
from .base import (READERS, WRITERS, CacheError, Manifest, StoreReader, StoreWriter, block_name, create_writer,
                   detect_format, open_reader)

__all__ = ["READERS", "WRITERS", "CacheError", "Manifest", "StoreReader", "StoreWriter", "block_name",
           "create_writer", "detect_format", "open_reader"]
