"""Words that carry no meaning in a search: left out of a query unless it holds nothing else.

Shared by the gallery's prompt search and the explorer's caption search. Besides finding what was meant
("knight in armor" finds "armor-clad knight"), it keeps a query off the largest index entries: "in" is in a
quarter of LAION captions, and intersecting with it costs 8x the rest of "knight in armor" at 12 M rows.
"""

STOPWORDS = frozenset(
    ("a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "from", "in", "into", "is", "it", "its", "of")
    + ("on", "or", "the", "this", "to", "was", "with")
)


def without_stopwords(words: list[str]) -> list[str]:
    """`words` less the stop words, or all of them when nothing else is left ("by", "the who")."""
    return [w for w in words if w not in STOPWORDS] or words
