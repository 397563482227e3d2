"""Words as the explorer's full-text index sees them, the shipped artist list, and prompts split into phrases.

The FTS5 index uses `unicode61 remove_diacritics 2` (see schema.py for why not porter). `words()` mirrors
that tokenizer in Python: lower case, diacritics removed, runs of letters and digits. Prompt phrases and
artist names are matched with it, so what the prompt link finds in a prompt is what the index counts.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from spellbook.stopwords import without_stopwords

_WORD = re.compile(r"[^\W_]+")


def words(text: str) -> list[str]:
    """The tokens unicode61 (remove_diacritics 2) makes of `text`: 'Dalí's' -> ['dali', 's']."""
    if text.isascii():
        return _WORD.findall(text.lower())
    decomposed = unicodedata.normalize("NFKD", text.lower())
    return _WORD.findall("".join(c for c in decomposed if not unicodedata.combining(c)))


def fts_phrase(text: str) -> str | None:
    """An FTS5 query matching `text` as an exact phrase (consecutive words), or None if it has no words."""
    tokens = words(text)
    return '"' + " ".join(tokens) + '"' if tokens else None


def search_words(text: str) -> list[str]:
    """The words a search for `text` requires: its tokens, once each, less stop words (unless only stop words)."""
    return without_stopwords(list(dict.fromkeys(words(text))))


def fts_all_words(text: str) -> str | None:
    """An FTS5 query matching captions that contain every word of `text` but stop words, in any order (as
    Datasette's search box does, less the stop words: see spellbook/stopwords.py)."""
    tokens = search_words(text)
    return " ".join(f'"{t}"' for t in tokens) if tokens else None


# ------------------------------------------------------------------------------------------------- artists
@dataclass(frozen=True)
class Artist:
    name: str  # display name, the first spelling in artists.txt
    spellings: tuple[str, ...]  # every spelling that counts, the display name first

    @property
    def fts_query(self) -> str:
        """Captions that mention any spelling; FTS counts each matching caption once."""
        return " OR ".join(q for q in (fts_phrase(s) for s in self.spellings) if q)


def parse_artist_list(text: str) -> list[Artist]:
    artists, seen = [], set()
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        spellings = tuple(s.strip() for s in line.split("|") if s.strip())
        for spelling in spellings:
            key = tuple(words(spelling))
            if not key:
                raise ValueError(f"artist list line {number}: {spelling!r} has no words")
            if key in seen:
                raise ValueError(f"artist list line {number}: {spelling!r} is listed twice")
            seen.add(key)
        artists.append(Artist(spellings[0], spellings))
    return artists


@lru_cache(maxsize=1)
def known_artists() -> tuple[Artist, ...]:
    """The shipped list (data/artists.txt; its header says where it comes from)."""
    text = resources.files("spellbook.explorer").joinpath("data", "artists.txt").read_text(encoding="utf-8")
    return tuple(parse_artist_list(text))


class ArtistFinder:
    """Finds known artists' names in text, longest spelling first, by whole words."""

    def __init__(self, artists: tuple[Artist, ...] | list[Artist]):
        self.by_words: dict[tuple[str, ...], Artist] = {}
        for artist in artists:
            for spelling in artist.spellings:
                self.by_words[tuple(words(spelling))] = artist
        self.longest = max((len(k) for k in self.by_words), default=0)

    def find(self, tokens: list[str]) -> list[tuple[int, int, Artist]]:
        """(start, end, artist) for each mention in `tokens`, left to right, not overlapping."""
        found, i = [], 0
        while i < len(tokens):
            for length in range(min(self.longest, len(tokens) - i), 0, -1):
                artist = self.by_words.get(tuple(tokens[i : i + length]))
                if artist is not None:
                    found.append((i, i + length, artist))
                    i += length
                    break
            else:
                i += 1
        return found

    def match(self, text: str) -> Artist | None:
        """The artist whose spelling is exactly `text` (in words), if any."""
        return self.by_words.get(tuple(words(text)))


# ------------------------------------------------------------------------------------------------- prompts
# Extra networks (<lora:name:0.8>, <hypernet:…>) name files, not training-data words.
_EXTRA_NETWORK = re.compile(r"<[^<>]*>")
# (word:1.2), [from:to:0.5]: the number and its colon go; the bracket goes below.
_WEIGHT = re.compile(r":\s*[+-]?(?:\d+\.?\d*|\.\d+)\s*(?=[)\]}])")
_ESCAPED_BRACKET = re.compile(r"\\([()\[\]{}])")
_BRACKETS = re.compile(r"[()\[\]{}]")
# Where one phrase ends and the next begins, as prompts are written: commas, A1111's BREAK, alternation
# [a|b], prompt editing [a:b] (its colon), semicolons and line breaks. Full stops are not used: they
# occur inside names ("H. R. Giger").
_SEPARATOR = re.compile(r"\s*(?:[,;|:\n]|\bBREAK\b)\s*")
# "a castle by greg rutkowski", "in the style of alphonse mucha": the artist part starts here.
_BY = re.compile(r"(?:^|\s)(?:by|in the style of|style of)\s+", re.IGNORECASE)
_AND = re.compile(r"\s+(?:and|&)\s+|\s*&\s*", re.IGNORECASE)
_EDGE_PUNCTUATION = " \t\"'.!?-_*#/\\"


@dataclass(frozen=True)
class PromptParts:
    phrases: list[str]  # the prompt's phrases without artist names, in order, each once
    artists: list[tuple[str, Artist | None]]  # (name as written, known artist or None), each once


def split_prompt(prompt: str, finder: ArtistFinder) -> PromptParts:
    """Split a prompt into the phrases and artist names a user wrote.

    'a (castle:1.3) by greg rutkowski and alphonse mucha, [[trending on artstation]]' gives the phrases
    ['a castle', 'trending on artstation'] and the artists Greg Rutkowski and Alphonse Mucha. A known
    artist's name is found anywhere; an unknown name counts as an artist only after "by" / "style of".
    """
    # 1. Strip the weighting syntax (A1111's (word:1.2), ((word)), [word]; NovelAI's {word}).
    text = _EXTRA_NETWORK.sub(" ", prompt)
    text = _WEIGHT.sub("", text)
    text = _ESCAPED_BRACKET.sub(" ", text)
    text = _BRACKETS.sub(" ", text)

    phrases: dict[str, str] = {}  # words -> the phrase as written (first spelling wins)
    artists: dict[str, tuple[str, Artist | None]] = {}

    def add_phrase(phrase: str) -> None:
        key = " ".join(words(phrase))
        if key:
            phrases.setdefault(key, phrase)

    def add_artist(name: str, artist: Artist | None) -> None:
        key = artist.name if artist else " ".join(words(name))
        if key and key not in artists:
            artists[key] = (artist.name if artist else name, artist)

    # 2. Split into phrases; split "… by A and B" into the phrase and its artists.
    for chunk in _SEPARATOR.split(text):
        chunk = " ".join(chunk.split()).strip(_EDGE_PUNCTUATION)
        if not chunk:
            continue
        by = _BY.search(chunk)
        if by:
            for name in _AND.split(chunk[by.end() :]):
                name = name.strip(_EDGE_PUNCTUATION)
                if words(name):
                    add_artist(name, finder.match(name))
            chunk = chunk[: by.start()].strip(_EDGE_PUNCTUATION)
        # 3. Known artists named without "by" ("greg rutkowski, artstation"): the name is an artist,
        # the rest of the chunk stays a phrase.
        tokens = words(chunk)
        mentions = finder.find(tokens)
        for start, end, artist in mentions:
            add_artist(" ".join(tokens[start:end]), artist)
        if mentions:
            kept, position = [], 0
            for start, end, _ in mentions:
                kept.append(" ".join(tokens[position:start]))
                position = end
            kept.append(" ".join(tokens[position:]))
            for piece in kept:
                add_phrase(piece.strip())
        else:
            add_phrase(chunk)
    return PromptParts(list(phrases.values()), list(artists.values()))
