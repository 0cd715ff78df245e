"""WordNet nouns, lemmas, senses and the pseudo-label hierarchy (sparc.data.wordnet).

These tests read Debian's ``wordnet-base`` files; without them they fail with the install command
(scripts/system-packages.sh installs the package for `make test`), never skip.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sparc.data.wordnet import (
    WordNet,
    WordNetMissing,
    caption_words,
    pseudo_labels,
    require_wordnet,
)

DOG_PATH = [
    "entity.n.01", "physical_entity.n.01", "object.n.01", "whole.n.02", "living_thing.n.01", "organism.n.01",
    "animal.n.01", "chordate.n.01", "vertebrate.n.01", "mammal.n.01", "placental.n.01", "carnivore.n.01",
    "canine.n.02", "dog.n.01",
]


@pytest.fixture(scope="module")
def wn() -> WordNet:
    return WordNet()


def test_dog_is_its_first_sense_with_its_hypernym_path(wn: WordNet) -> None:
    dog = wn.first_sense("dog")
    assert (dog.name, dog.offset, dog.label) == ("dog.n.01", 2084071, "dog")
    assert dog.lemmas == ("dog", "domestic_dog", "Canis_familiaris")
    assert [s.name for s in wn.path(dog)] == DOG_PATH
    assert wn.first_sense("car").offset == 2958343 and wn.first_sense("car").name == "car.n.01"
    # Sense numbers count in the first lemma's own list: Wales (an instance: its path goes up the
    # instance hypernym) and a second sense.
    assert wn.first_sense("wales").name == "wales.n.01"
    assert [s.name for s in wn.path(wn.first_sense("wales"))][-2] == "principality.n.01"
    assert wn.synset(wn.index["dog"][1]).name == "frump.n.01"
    with pytest.raises(KeyError, match="no noun synset at offset"):
        wn.synset(2084072)


@pytest.mark.parametrize(
    ("word", "lemma"),
    [("dogs", "dog"), ("boxes", "box"), ("churches", "church"), ("ladies", "lady"), ("men", "man"),
     ("feet", "foot"), ("geese", "goose"), ("children", "child"), ("hot_dogs", "hot_dog"),
     ("eyes", "eye"),  # a lemma of its own (an opinion), but eye's first sense is tagged 263 times to its 4
     ("glass", "glass"), ("xyzzy", None)],
)
def test_morphy_finds_the_noun_lemma(wn: WordNet, word: str, lemma: str | None) -> None:
    assert wn.morphy(word) == lemma


def test_caption_nouns_take_compounds_and_drop_stop_words_and_generic_nouns(wn: WordNet) -> None:
    assert caption_words("A dog's Hot-Dogs, (2) ice cream!") == ["a", "dog", "hot-dogs", "ice", "cream"]
    assert wn.nouns("Two dogs eating a hot dog in front of the church") == ("dog", "eating", "hot_dog", "church")
    assert wn.nouns("ice cream and an ice-cream cone") == ("ice_cream", "ice-cream_cone")
    assert wn.nouns("smiling face with heart-eyes") == ("smiling", "face", "heart", "eye")
    assert wn.nouns("a photo of it, in the background") == ()  # a, it, in: stop words; photo, background: generic
    assert wn.nouns("flag: Costa Rica") == ("flag", "costa_rica")


def test_caption_synsets_are_first_senses_without_too_generic_ones(wn: WordNet) -> None:
    names = [s.name for s in wn.caption_synsets("a grinning dog on an object")]
    assert names == ["smile.n.01", "dog.n.01"]  # object.n.01 is 2 levels below entity: dropped


def test_pseudo_labels_cut_the_paths_at_the_depth(wn: WordNet) -> None:
    captions = ["a dog", "a cat and a dog", "nothing in it", "a dog"]
    deep = pseudo_labels(captions, 13, wn)
    assert deep.labels == [("dog.n.01",), ("cat.n.01", "dog.n.01"), (), ("dog.n.01",)]
    h = deep.hierarchy
    assert h.depth("dog.n.01") == 13 and h.max_depth == 13 and h.names["dog.n.01"] == "dog"
    assert h.parents["physical_entity.n.01"] == "__root__"  # entity.n.01 is the root, not a label
    assert [h.ancestor_at("dog.n.01", d) for d in (1, 6, 12)] == ["physical_entity.n.01", "animal.n.01", "canine.n.02"]
    assert h.ancestor_at("cat.n.01", 11) == "carnivore.n.01"
    assert deep.coverage() == 0.75

    cut = pseudo_labels(captions, 6, wn)
    assert cut.labels == [("animal.n.01",), ("animal.n.01",), (), ("animal.n.01",)]
    assert cut.hierarchy.max_depth == 6 and cut.hierarchy.labels == sorted(cut.hierarchy.labels)
    assert set(cut.hierarchy.labels) == set(DOG_PATH[1:7])
    with pytest.raises(ValueError, match="wordnet depth must be >= 1"):
        pseudo_labels(captions, 0, wn)


def test_missing_wordnet_names_the_package(tmp_path: Path) -> None:
    with pytest.raises(WordNetMissing, match=r"install the Debian package wordnet-base \(apt-get install wordnet-base"):
        require_wordnet(tmp_path)
    with pytest.raises(FileNotFoundError, match="index.noun not found"):
        WordNet(tmp_path)
