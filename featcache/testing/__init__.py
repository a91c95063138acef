"""Helpers for featcache's own tests and for plugin authors' tests (zarr ships ``zarr.testing`` the same way).

``images``: random images, ImageFolder trees and WebDataset image shards; ``caches``: tiny caches extracted with a
random-init teacher, and a clean Accelerate state; ``toystore``: synthetic manifests, targets and records for the
store conformance suite; ``processes``: real child processes for the fault tests (start, wait for a
lock or a step, see them gone); ``options``: command-line options as comparable text. Nothing here is imported by
featcache itself.
"""
