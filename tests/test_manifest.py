"""The cache schema: block names and their inverse, identity, unit arithmetic, path validation."""
import pytest

from featcache.errors import CacheError
from featcache.manifest import Manifest, block_index, block_name, diff_keys, is_block, safe_relpath


def test_block_names_round_trip():
    for i in (0, 1, 11, 23):
        assert block_index(block_name(i)) == i and is_block(block_name(i))
    for other in ("logits", "logits__topk_values", "block_", "block_x", "xblock_1", "block_1_extra"):
        assert block_index(other) is None and not is_block(other)


def test_units_cover_rows_once():
    m = Manifest(num_rows=10, storage={"shard_size": 4}, views={"count": 2}, layers=[0, 1], targets={"logits": {}})
    assert m.num_units == 3 and m.views_per_sample == 2 and m.layers == [0, 1] and m.target_names == ["logits"]
    rows = [r for u in range(m.num_units) for r in m.unit_rows(u)]
    assert rows == list(range(10)) and all(m.unit_of(r) == u for u in range(3) for r in m.unit_rows(u))


def test_identity_ignores_data_root_and_json_round_trips():
    a = Manifest(teacher={"name": "t"}, data={"root": "/a", "file_list_sha256": "x"}, layers=[0])
    b = a.copy()
    b["data"]["root"] = "/elsewhere"
    assert a.identity() == b.identity() and a["data"]["root"] == "/a"
    b["layers"] = [1]
    assert diff_keys(a.identity(), b.identity()) == ["layers"]
    assert Manifest.from_json(a.to_json()) == a


def test_diff_keys_names_nested_paths():
    assert diff_keys({"a": {"b": 1, "c": 2}, "d": 3}, {"a": {"b": 1, "c": 5}, "e": 3}) == ["a.c", "d", "e"]


@pytest.mark.parametrize("bad", ["", "/etc/passwd", "../x", "a/../../x", "a\\b", "a\x00b"])
def test_safe_relpath_refuses_escapes(bad):
    with pytest.raises(CacheError, match="unsafe path"):
        safe_relpath(bad)


def test_safe_relpath_keeps_good_paths():
    assert safe_relpath("class_0/img_1.png") == "class_0/img_1.png"
