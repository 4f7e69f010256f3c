"""Demo data: (query, positive) retrieval pairs from the Python documentation that ships with Python."""

from __future__ import annotations

import re

from .examples import Example, ExampleList

try:
    from pydoc_data.topics import topics
except ImportError:  # some distributions strip pydoc_data from the standard library: demo_pairs then says so
    topics = None

__all__ = ["demo_pairs"]

# A sentence ends at . ! ? after a lowercase letter, digit, quote or parenthesis and before a capital, quote or
# "(" — good enough for the reference manual's prose (it avoids "e.g. x", "i.e. y" and "3.12").
_SENTENCE_END = re.compile(r"(?<=[a-z0-9)\"”][.!?])\s+(?=[A-Z\"“(])")
_UNDERLINE = re.compile(r"\s*([*=\-^~])\1{2,}\s*")
_MIN_POSITIVE_CHARS = 40
_NOT_PROSE = ("* ", "Note:", "Changed in", "New in", "Added in", "Deprecated", "See also", "Warning:")


def _documentation_topics() -> dict[str, str]:
    if topics is None:
        raise RuntimeError(
            "demo_pairs needs the Python documentation topics (pydoc_data.topics), which this Python installation "
            "lacks (some distributions strip it; e.g. install the full standard library package). Use your own "
            "pairs file instead (read_csv / read_jsonl with text and text_pair)."
        )
    if not isinstance(topics, dict) or not topics:
        raise RuntimeError("pydoc_data.topics.topics is not the expected dict of documentation topics")
    return topics


def _prose_paragraphs(document: str) -> list[str]:
    """Paragraphs of running prose (one indentation level, no grammar, code, bullets, notes or headings), each
    joined into one line."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", document):
        lines = [line for line in block.split("\n") if line.strip()]
        if not lines or len({len(line) - len(line.lstrip()) for line in lines}) != 1:
            continue
        if any(_UNDERLINE.fullmatch(line) for line in lines):
            continue
        text = re.sub(r"\s+", " ", " ".join(line.strip() for line in lines))
        if "::=" in text or ">>>" in text or text.startswith(_NOT_PROSE):
            continue
        paragraphs.append(text)
    return paragraphs


def _all_demo_pairs(*, min_query_chars: int, max_query_chars: int, max_positive_chars: int
                    ) -> list[tuple[str, str, str]]:
    """Every ``(topic, query, positive)``: topics in sorted order, paragraphs in document order, duplicates (the
    same sentence under several topics) dropped at their later occurrences."""
    topics = _documentation_topics()
    seen: set[str] = set()
    pairs = []
    for topic in sorted(topics):
        for paragraph in _prose_paragraphs(topics[topic]):
            sentences = _SENTENCE_END.split(paragraph)
            if len(sentences) < 2 or not min_query_chars <= len(sentences[0]) <= max_query_chars:
                continue
            query, positive = sentences[0], sentences[1]
            for sentence in sentences[2:]:  # following sentences while they fit
                if len(positive) + 1 + len(sentence) > max_positive_chars:
                    break
                positive = f"{positive} {sentence}"
            if not _MIN_POSITIVE_CHARS <= len(positive) <= max_positive_chars:
                continue
            if query in seen or positive in seen:
                continue
            seen.update((query, positive))
            pairs.append((topic, query, positive))
    return pairs


def demo_pairs(n: int = 256, *, min_query_chars: int = 40, max_query_chars: int = 150,
               max_positive_chars: int = 180, name: str = "demo_pairs: n") -> ExampleList:
    """``n`` (query, positive) retrieval pairs made from the Python reference documentation that ships with Python
    (``pydoc_data.topics.topics``: 79 topics such as "assignment" or "string-methods"; real text, not ours).

    Pairing (inverse-cloze style): a prose paragraph is split into sentences; the query is its first sentence
    (``min_query_chars`` to ``max_query_chars`` characters), the positive is the sentences that follow, as many as
    fit in ``max_positive_chars`` (at least one, at least 40 characters): with the MiniLM tokenizer about 25 + 30
    tokens per pair, so a pass over the pairs is cheap on a CPU. Grammar, code, bullets and notes are skipped;
    text repeated under several topics is used once. Pretrained all-MiniLM-L6-v2 ranks the own positive first
    among 32 for about two thirds of the queries (0.66 for the default 256 pairs; chance: 1/32 = 0.031), and
    masking half of its heads costs about 0.1 of that.

    Selection and order, deterministic (no randomness): each topic's pairs are spread evenly over a list (pair i
    of a topic with k pairs sorts at (i + 0.5) / k, ties by topic name) and the first ``n`` are taken, so every
    topic contributes; these are then ordered by the positive's length (ties: the spread order), so that a
    retrieval group / batch of consecutive pairs has similar lengths and little padding. The documentation, and
    so the pairs, differ slightly between Python versions (Python 3.10-3.13 give 326-369 pairs with the
    defaults).

    Returns an :class:`ExampleList` of ``Example(text=query, text_pair=positive)``. Raises RuntimeError when
    ``pydoc_data`` is missing, ValueError when fewer than ``n`` pairs exist (naming ``n`` as ``name``: the CLI's
    ``--pairs``).
    """
    pairs = _all_demo_pairs(min_query_chars=min_query_chars, max_query_chars=max_query_chars,
                            max_positive_chars=max_positive_chars)
    counts: dict[str, int] = {}
    for topic, _, _ in pairs:
        counts[topic] = counts.get(topic, 0) + 1
    position: dict[str, int] = {}
    keyed = []
    for topic, query, positive in pairs:
        i = position.get(topic, 0)
        position[topic] = i + 1
        keyed.append(((i + 0.5) / counts[topic], topic, i, query, positive))
    keyed.sort(key=lambda item: item[:3])
    if n < 1 or n > len(keyed):
        raise ValueError(f"{name} must be between 1 and {len(keyed)} (pairs available in this Python's "
                         f"documentation with these options), got {n}")
    chosen = sorted(keyed[:n], key=lambda item: (len(item[4]), item[:3]))
    return ExampleList((Example(text=query, text_pair=positive) for _, _, _, query, positive in chosen),
                       source="pydoc_data.topics (Python documentation): first sentence -> following sentences")
