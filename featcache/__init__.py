"""featcache: run frozen timm teachers once, distil many students from the cache."""
__version__ = "0.1.0"

__all__ = ["__version__"]
