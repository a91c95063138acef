"""The registry names each plugin once, refuses duplicates and lists what exists for an unknown name."""
import pytest

from featcache.errors import FeatcacheError, UnknownNameError
from featcache.registry import Registry


def test_registration_sets_the_name_once():
    things = Registry("thing")

    @things.register("alpha")
    class Alpha:
        pass

    assert things.get("alpha") is Alpha and Alpha.name == "alpha"
    assert "alpha" in things and list(things) == ["alpha"] and len(things) == 1


def test_duplicate_and_unknown_names():
    things = Registry("thing")
    things.register("a")(type("A", (), {}))
    with pytest.raises(ValueError, match="registered twice"):
        things.register("a")(type("B", (), {}))
    with pytest.raises(UnknownNameError, match="unknown thing 'zzz'; known: a") as err:
        things.get("zzz")
    assert isinstance(err.value, (KeyError, FeatcacheError)) and str(err.value).startswith("unknown thing")


def test_every_method_and_store_is_named_by_its_registration():
    from featcache.methods import METHODS
    from featcache.stores import READERS, WRITERS

    for registry in (METHODS, READERS, WRITERS):
        assert all(registry.get(name).name == name for name in registry)
