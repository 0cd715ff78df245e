"""Hierarchy: depths, lifting labels to a depth, JSON round trip and malformed trees."""

from __future__ import annotations

import json

import pytest

from sparc.data.hierarchy import ROOT, Hierarchy


@pytest.fixture()
def tree() -> Hierarchy:
    # root > animal > {mammal > {cat, dog}, bird}; root > plant (a shallow leaf)
    return Hierarchy.from_parents(
        {"animal": None, "mammal": "animal", "cat": "mammal", "dog": "mammal", "bird": "animal", "plant": ""},
        {"animal": "Animal", "cat": "Cat"},
    )


def test_depth_and_max_depth(tree: Hierarchy) -> None:
    assert tree.depth(ROOT) == 0
    assert [tree.depth(x) for x in ("animal", "mammal", "cat", "bird", "plant")] == [1, 2, 3, 2, 1]
    assert tree.max_depth == 3
    with pytest.raises(KeyError, match="'fish' is not in the hierarchy"):
        tree.depth("fish")


def test_labels_and_names(tree: Hierarchy) -> None:
    assert tree.labels == ["animal", "mammal", "cat", "dog", "bird", "plant"]
    assert tree.names["animal"] == "Animal"
    assert tree.names["dog"] == "dog"  # default name = id
    assert tree.parents["animal"] == ROOT and tree.parents["plant"] == ROOT


def test_ancestor_at(tree: Hierarchy) -> None:
    assert tree.ancestor_at("cat", 1) == "animal"
    assert tree.ancestor_at("cat", 2) == "mammal"
    assert tree.ancestor_at("cat", 3) == "cat"
    assert tree.ancestor_at("cat", 0) == ROOT
    assert tree.ancestor_at("plant", 3) == "plant"  # shallower labels map to themselves
    assert tree.ancestor_at("bird", 5) == "bird"


def test_labels_at_depth(tree: Hierarchy) -> None:
    assert tree.labels_at_depth(0) == [ROOT]
    assert tree.labels_at_depth(1) == ["animal", "plant"]
    # depth 2: mammal and bird, plus the shallower leaf plant
    assert tree.labels_at_depth(2) == ["mammal", "bird", "plant"]
    assert tree.labels_at_depth(3) == ["cat", "dog", "bird", "plant"]
    # every leaf lifts into labels_at_depth(d)
    leaves = ["cat", "dog", "bird", "plant"]
    for d in range(4):
        assert {tree.ancestor_at(lab, d) for lab in leaves} <= set(tree.labels_at_depth(d))


def test_json_round_trip(tree: Hierarchy, tmp_path) -> None:
    data = tree.to_json()
    assert json.loads(json.dumps(data)) == data
    back = Hierarchy.from_json(data)
    assert back.parents == tree.parents
    assert back.names == tree.names
    assert [back.depth(x) for x in back.labels] == [tree.depth(x) for x in tree.labels]
    tree.save(tmp_path / "h.json")
    loaded = Hierarchy.load(tmp_path / "h.json")
    assert loaded.parents == tree.parents and loaded.names == tree.names


def test_from_json_user_format() -> None:
    h = Hierarchy.from_json(
        {"labels": [{"id": "a", "parent": None}, {"id": "b", "name": "Bee", "parent": "a"}, {"id": "c"}]}
    )
    assert h.parents == {ROOT: None, "a": ROOT, "b": "a", "c": ROOT}
    assert h.names["b"] == "Bee" and h.names["c"] == "c"


def test_flat() -> None:
    h = Hierarchy.flat(["x", "y"])
    assert h.labels == ["x", "y"] and h.max_depth == 1
    assert h.labels_at_depth(1) == ["x", "y"]


@pytest.mark.parametrize(
    "parents",
    [{"a": "b", "b": "a"}, {"a": "a"}, {"a": None, "b": "c", "c": "d", "d": "b"}],
)
def test_cycle_rejected(parents: dict) -> None:
    with pytest.raises(ValueError, match="cycle"):
        Hierarchy.from_parents(parents)


def test_unknown_parent_rejected() -> None:
    with pytest.raises(ValueError, match="'b' has unknown parent 'zzz'"):
        Hierarchy.from_parents({"a": None, "b": "zzz"})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"labels": [{"id": "a"}, {"id": "a", "parent": None}]}, "'a' is listed more than once"),
        ({"labels": [{"name": "no id"}]}, "expected"),
        ({"nodes": []}, "expected"),
        ({"labels": ["a"]}, "expected"),
    ],
)
def test_bad_json(data: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Hierarchy.from_json(data)


def test_load_missing(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="hierarchy file not found"):
        Hierarchy.load(tmp_path / "nope.json")
