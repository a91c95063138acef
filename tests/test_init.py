"""The package's public face (featcache/__init__.py): lazy re-exports keep `import featcache` and `--help` light."""
from __future__ import annotations

import subprocess
import sys

import featcache


def modules_after(code: str) -> set[str]:
    """Modules loaded by a fresh interpreter after running ``code``."""
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys; print(sorted(sys.modules))"],
                         capture_output=True, text=True, check=True).stdout.splitlines()[-1]
    return set(eval(out))


def test_import_and_help_load_no_torch_and_no_backend():
    heavy = {"torch", "timm", "zarr", "h5py", "webdataset", "numpy", "yaml", "accelerate"}
    assert not heavy & modules_after("import featcache; featcache.FeatcacheError")
    help_code = ("from featcache.cli import main\n"
                 "try:\n    main(['--help'])\nexcept SystemExit:\n    pass")
    assert not heavy & modules_after(help_code)


def test_every_public_name_resolves():
    for name in featcache.__all__:
        assert getattr(featcache, name) is not None, name
    assert featcache.run_extract.__module__ == "featcache.extract"
    assert featcache.Manifest.__module__ == "featcache.manifest"
    assert set(featcache.__all__) <= set(dir(featcache))


def test_errors_are_the_same_objects():
    from featcache.errors import ConfigError, FeatcacheError

    assert featcache.FeatcacheError is FeatcacheError and featcache.ConfigError is ConfigError


def test_unknown_attribute():
    import pytest

    with pytest.raises(AttributeError, match="no_such_name"):
        featcache.no_such_name  # noqa: B018
