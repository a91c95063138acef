"""``python -m featcache``: the command line, as ``featcache`` and ``python -m featcache.cli`` run it."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
