"""Pseudo-labels and a label hierarchy from captions, through WordNet 3.0's noun hierarchy.

For datasets without labels (``data.labels_from: captions``, docs/unlabeled.md) each caption's
nouns become labels: WordNet synsets, lifted along their hypernym path to at most
``data.wordnet_depth`` levels below ``entity.n.01``, and the tree of those paths is the
hierarchy, so concepts, hierarchical Jaccard by depth and probes run as on labelled data.

WordNet is read straight from the files of Debian's ``wordnet-base`` (``/usr/share/wordnet``):
``index.noun`` (lemma -> synset offsets, most frequent sense first), ``data.noun`` (a synset's
lemmas and pointers, at its byte offset), ``noun.exc`` (irregular plurals) and ``cntlist.rev``
(how often each sense is tagged in the SemCor corpus). Four text formats of a few lines' parsing
need no extra Python package (NLTK would also need a ``lexnames`` file that Debian does not ship)
and nothing is downloaded at run time.

The choices (docs/unlabeled.md, "Pseudo-labels from captions"):

* Nouns: the caption is lower-cased and split into words (letters, ``'`` and ``-``); runs of up
  to :data:`MAX_COMPOUND` words that WordNet lists as one noun (``ice cream``, ``hot dogs``) are
  taken first, longest first, left to right; a hyphenated word that is no noun is split at its
  hyphens. Stop words (:data:`STOP_WORDS`) and generic caption nouns (:data:`GENERIC_NOUNS`)
  are dropped, and so is a noun whose sense lies less than :data:`MIN_SYNSET_DEPTH` levels below
  ``entity.n.01`` (thing, object, matter: true of everything, they separate nothing). Words are
  taken as nouns wherever WordNet has a noun of that form, without a part-of-speech tagger: in
  captions the modifiers it then keeps are mostly nameable too ("grinning face" -> smile, face).
* Lemmas: WordNet's morphy for nouns: the exception list (``noun.exc``: men -> man), the word
  itself, and the suffix rules (-s, -ses, -xes, -zes, -ches, -shes, -men, -ies), kept when
  ``index.noun`` lists them. Where several forms are nouns ("eyes": the lemma *eyes*, an opinion,
  and *eye*), the form whose most frequent sense is tagged most often in SemCor wins
  (eye 263 times, eyes 4), so plurals mean their singular unless the plural is the commoner noun.
* Senses: the first (most frequent) sense of the lemma, WordNet's own order from the SemCor
  counts. The most-frequent-sense rule is the standard baseline of word-sense disambiguation
  and is hard to beat without context models; captions give little context to use.
* Tree: WordNet is a graph (a synset may have several hypernyms); each synset follows its first
  listed hypernym (or instance hypernym: Wales -> principality), so every synset has one path to
  ``entity.n.01``, the root (depth 0; not a label). A synset deeper than ``depth`` is replaced by
  its ancestor at ``depth``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from sparc.data.hierarchy import Hierarchy

WORDNET_DIR = Path("/usr/share/wordnet")
WORDNET_PACKAGE = "wordnet-base"
WORDNET_FILES = ("index.noun", "data.noun", "noun.exc", "cntlist.rev")
ROOT_OFFSET = 1740  # entity.n.01
MAX_COMPOUND = 3
MIN_SYNSET_DEPTH = 3
# WordNet's noun detachment rules (suffix -> replacement), in morphy's order.
NOUN_SUFFIXES = (("s", ""), ("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"),
                 ("men", "man"), ("ies", "y"))
# Function words (many are also WordNet nouns: "a" vitamin A, "in" inch, "it", "us", "can", "will").
STOP_WORDS = frozenset("""
a about above across after again against all almost along also although always am among an and
another any are around as at be because been before behind being below beneath beside besides
between beyond both but by can could did do does doing done down during each either else even ever
every few for from further had has have having he her here hers herself him himself his how however
i if in inside into is it its itself just may me might mine more most much must my myself near
neither no nor not now of off on once only onto or other our ours out outside over own per quite
rather same shall she should since so some such than that the their theirs them themselves then there
these they this those though through to too toward towards under until up upon us very via was we
well were what when where whether which while who whom whose why will with within without would yet
you your yours one two three four five six seven eight nine ten nothing anything everything none
nobody someone anyone everyone somebody anybody everybody
""".split())
# Nouns that describe the caption or a position rather than what is shown.
GENERIC_NOUNS = frozenset("""
image picture photo photograph photography view shot scene background foreground closeup close-up
top bottom front back side middle left right center centre part piece kind type sort lot bunch couple
pair number group variety thing things something stuff way area
""".split())


class WordNetMissing(FileNotFoundError):
    """WordNet's files are not installed; the message names the Debian package."""


def require_wordnet(root: Path = WORDNET_DIR) -> Path:
    """``root`` when it holds every file of :data:`WORDNET_FILES`, else :class:`WordNetMissing`
    naming the missing file and the install command."""
    for name in WORDNET_FILES:
        if not (root / name).is_file():
            raise WordNetMissing(
                f"WordNet: {root / name} not found; install the Debian package {WORDNET_PACKAGE} "
                f"(apt-get install {WORDNET_PACKAGE}; scripts/system-packages.sh does it as root)"
            )
    return root


@dataclass(frozen=True)
class Synset:
    """One noun synset: its byte ``offset`` in data.noun (WordNet's id), ``name`` as NLTK spells
    it (``dog.n.01``: first lemma, lower case, and its sense number), its lemmas (underscores for
    spaces) and the offset of its first hypernym (None for ``entity.n.01``)."""

    offset: int
    name: str
    lemmas: tuple[str, ...]
    hypernym: int | None

    @property
    def label(self) -> str:
        """Display name: the first lemma with spaces (``ice cream``)."""
        return self.lemmas[0].replace("_", " ")


class WordNet:
    """The noun part of WordNet 3.0, read from ``root`` (Debian's ``wordnet-base`` files)."""

    def __init__(self, root: Path = WORDNET_DIR) -> None:
        self.root = require_wordnet(Path(root))
        self._synsets: dict[int, Synset] = {}
        self._lemmas: dict[str, str | None] = {}

    @cached_property
    def index(self) -> dict[str, tuple[int, ...]]:
        """lemma -> synset offsets, most frequent sense first (``index.noun``)."""
        out = {}
        with (self.root / "index.noun").open(encoding="utf-8") as fh:
            for line in fh:
                if line.startswith(" "):  # the licence header
                    continue
                f = line.split()
                n_ptr = int(f[3])
                n_senses = int(f[2])
                offsets = f[6 + n_ptr:6 + n_ptr + n_senses]
                out[f[0]] = tuple(int(o) for o in offsets)
        return out

    @cached_property
    def exceptions(self) -> dict[str, tuple[str, ...]]:
        """Irregular inflection -> base forms (``noun.exc``: ``feet -> foot``)."""
        out = {}
        with (self.root / "noun.exc").open(encoding="utf-8") as fh:
            for line in fh:
                f = line.split()
                if len(f) >= 2:
                    out[f[0]] = tuple(f[1:])
        return out

    @cached_property
    def tag_counts(self) -> dict[tuple[str, int], int]:
        """(lemma, noun sense number) -> times that sense is tagged in SemCor (``cntlist.rev``:
        ``sense_key sense_number count``; noun keys have ``%1:``)."""
        out = {}
        with (self.root / "cntlist.rev").open(encoding="utf-8") as fh:
            for line in fh:
                key, number, count = line.split()
                lemma, _, rest = key.partition("%")
                if rest.startswith("1:"):
                    out[lemma, int(number)] = int(count)
        return out

    @cached_property
    def _data(self) -> bytes:
        return (self.root / "data.noun").read_bytes()

    def synset(self, offset: int) -> Synset:
        """The synset at byte ``offset`` of data.noun (KeyError naming it when none starts there)."""
        if offset in self._synsets:
            return self._synsets[offset]
        data = self._data
        end = data.find(b"\n", offset)
        line = data[offset:end].decode("utf-8")
        f = line.split(" | ", 1)[0].split()
        if not f or not f[0].isdigit() or int(f[0]) != offset:
            raise KeyError(f"WordNet: no noun synset at offset {offset:08d}")
        n_words = int(f[3], 16)
        lemmas = tuple(f[4 + 2 * i] for i in range(n_words))
        p = 4 + 2 * n_words
        hypernym = None
        for i in range(int(f[p])):
            symbol, target = f[p + 1 + 4 * i], f[p + 2 + 4 * i]
            if symbol in ("@", "@i"):
                hypernym = int(target)
                break
        first = lemmas[0].lower()
        sense = self.index[first].index(offset) + 1
        syn = Synset(offset=offset, name=f"{first}.n.{sense:02d}", lemmas=lemmas, hypernym=hypernym)
        self._synsets[offset] = syn
        return syn

    def morphy(self, word: str) -> str | None:
        """The noun lemma of ``word`` (lower case, ``_`` between the words of a compound), or None
        when no form is a WordNet noun. Candidates: ``noun.exc``'s bases, the word, then the
        suffix rules (:data:`NOUN_SUFFIXES`); of those in ``index.noun`` the one whose first sense
        is tagged most often in SemCor (ties: the earlier)."""
        if word in self._lemmas:
            return self._lemmas[word]
        forms = [*self.exceptions.get(word, ()), word]
        forms += [word[: -len(suffix)] + base for suffix, base in NOUN_SUFFIXES if word.endswith(suffix)]
        known = [f for f in dict.fromkeys(forms) if f in self.index]
        lemma = max(known, key=lambda f: (self.tag_counts.get((f, 1), 0), -known.index(f))) if known else None
        self._lemmas[word] = lemma
        return lemma

    def first_sense(self, lemma: str) -> Synset:
        """The most frequent sense of noun ``lemma`` (KeyError when it is no noun)."""
        return self.synset(self.index[lemma][0])

    def path(self, synset: Synset) -> list[Synset]:
        """Hypernym path from ``entity.n.01`` down to ``synset`` along first hypernyms; its
        depth is ``len(path) - 1``."""
        chain = [synset]
        while chain[-1].hypernym is not None:
            chain.append(self.synset(chain[-1].hypernym))
        return chain[::-1]

    def nouns(self, caption: str) -> tuple[str, ...]:
        """Noun lemmas of ``caption`` in order of appearance, each once (module docstring)."""
        words = caption_words(caption)
        out: list[str] = []
        i = 0
        while i < len(words):
            n, lemma = self._longest_noun(words, i)
            if lemma is not None:
                if n > 1 or keep_word(words[i]):
                    out.append(lemma)
                i += n
            elif "-" in words[i]:  # no noun as a whole: its parts
                words[i:i + 1] = [w for w in words[i].split("-") if w]
            else:
                i += 1
        return tuple(lemma for lemma in dict.fromkeys(out) if lemma not in GENERIC_NOUNS)

    def _longest_noun(self, words: list[str], i: int) -> tuple[int, str | None]:
        """The longest run ``words[i:i + n]`` (n <= :data:`MAX_COMPOUND`) that is a WordNet noun,
        as ``(n, lemma)``; a run of several words neither starts nor ends with a stop word.
        ``(1, None)`` when not even ``words[i]`` is a noun."""
        for n in range(min(MAX_COMPOUND, len(words) - i), 0, -1):
            span = words[i:i + n]
            if n > 1 and (span[0] in STOP_WORDS or span[-1] in STOP_WORDS):
                continue
            lemma = self.morphy("_".join(span))
            if lemma is not None:
                return n, lemma
        return 1, None

    def caption_synsets(self, caption: str) -> list[Synset]:
        """First senses of ``caption``'s nouns, without those shallower than
        :data:`MIN_SYNSET_DEPTH`, each once."""
        out = []
        for lemma in self.nouns(caption):
            syn = self.first_sense(lemma)
            if len(self.path(syn)) - 1 >= MIN_SYNSET_DEPTH and syn not in out:
                out.append(syn)
        return out


def caption_words(caption: str) -> list[str]:
    """Lower-cased words of ``caption``: runs of letters, ``'`` and ``-`` (a possessive ``'s``
    and edge punctuation stripped); other characters separate words."""
    cleaned = "".join(c if c.isalpha() or c in "'-" else " " for c in caption.lower())
    words = []
    for w in cleaned.split():
        w = w.removesuffix("'s").strip("'-")
        if w:
            words.append(w)
    return words


def keep_word(word: str) -> bool:
    """Whether a single word may be a noun label: no stop word, at least two letters."""
    return word not in STOP_WORDS and len(word) > 1


@dataclass(frozen=True)
class PseudoLabels:
    """Labels of each caption (synset names, ``dog.n.01``) and the hierarchy of their paths."""

    labels: list[tuple[str, ...]]
    hierarchy: Hierarchy
    depth: int

    def coverage(self) -> float:
        """Fraction of captions with at least one label."""
        return sum(bool(x) for x in self.labels) / len(self.labels) if self.labels else 0.0


def pseudo_labels(captions: Sequence[str], depth: int, wordnet: WordNet | None = None) -> PseudoLabels:
    """Label each caption with its nouns' synsets cut to ``depth`` (>= 1) levels below
    ``entity.n.01``; the hierarchy holds every label and its ancestors (``entity.n.01`` is the
    hierarchy's root, depth 0), label ids sorted by name. ValueError for ``depth < 1``."""
    if depth < 1:
        raise ValueError(f"wordnet depth must be >= 1, got {depth}")
    wn = wordnet or WordNet()
    labels: list[tuple[str, ...]] = []
    parents: dict[str, str | None] = {}
    names: dict[str, str] = {}
    cache: dict[str, tuple[str, ...]] = {}
    for caption in captions:
        if caption not in cache:
            cut = []
            for syn in wn.caption_synsets(caption):
                path = wn.path(syn)[1:depth + 1]  # below the root, at most `depth` levels
                for parent, node in zip([None, *path[:-1]], path, strict=True):
                    parents.setdefault(node.name, parent.name if parent else None)
                    names.setdefault(node.name, node.label)
                cut.append(path[-1].name)
            cache[caption] = tuple(dict.fromkeys(cut))
        labels.append(cache[caption])
    order = sorted(parents)
    hierarchy = Hierarchy.from_parents({k: parents[k] for k in order}, {k: names[k] for k in order})
    return PseudoLabels(labels=labels, hierarchy=hierarchy, depth=depth)

