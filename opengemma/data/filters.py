"""Heuristic quality filters (report "Filtering"; rules of Gopher, Rae et al. 2021, Table A1 and
section A.1.1, and of C4, Raffel et al. 2020, section 2.2).

Each filter is a small object called on one document's text that returns ``(text, None)`` to keep
it (``text`` possibly rewritten: C4 drops lines) or ``(None, reason)`` to drop it, ``reason``
naming the rule (the data card counts removals per rule). Thresholds are the papers' and datatrove's
defaults and every one can be changed from the mixture (``filters.<name> = {option = value}``).

* :class:`GopherQuality`: word count, mean word length, ``#``/ellipsis-to-word ratios, bullet and
  ellipsis line ratios, share of words with a letter, stop-word presence;
* :class:`GopherRepetition`: duplicate lines/paragraphs (count and character fractions), top
  2-4-gram character fractions, duplicated 5-10-gram character fractions;
* :class:`C4Quality`: keep only lines with terminal punctuation and 3+ words, drop lines with
  "javascript" or cookie/terms-of-use boilerplate, drop pages with "lorem ipsum" or ``{`` or with
  fewer than 5 sentences left.

Why hand-written rather than datatrove's blocks of the same rules: datatrove splits words and
sentences with spaCy's tokenizer, which makes its filters several times slower (``bench/bench_data.py``
prints the ratio); here words come from one regular expression that mimics spaCy's English
tokenizer closely enough that the keep/drop decision agrees with datatrove's on >= 99% of the C4
slice (``bench/results/data-filters.md``). The rule logic follows datatrove's line for line.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Callable

from ..errors import OpenGemmaError

# Words as spaCy's English tokenizer cuts them (what datatrove's filters count), in three steps
# per whitespace-separated chunk: split off leading marks (prefixes) and trailing marks and
# contractions (suffixes), keep exceptions whole ("Nov.", "U.S.", URLs), then split inside at
# spaCy's infixes (hyphens between letters, "a/b", "x=y", "2-3", "2+3", "...").
_ABBREV = frozenset(w + "." for w in (  # spaCy's English tokenizer exceptions ending in a dot
    "Adm Ala Apr Ariz Ark Aug Bros Calif Co Colo Conn Corp Dec Del Dr Feb Fla Ga Gen Gov Ia Id Ill Inc Ind Jan Jr "
    "Jul Jun Kan Kans Ky La Ltd Mar Mass Md Messrs Mich Minn Miss Mo Mont Mr Mrs Ms Mt Neb Nebr Nev Nov Oct Okla "
    "Ore Pa Prof Rep Rev Sen Sep Sept St Tenn Va Wash Wis co vs e.g i.e a.m p.m Ph.D").split())
_PREFIX = re.compile(r"""^(?:\.\.+|…|[\"'(\[{<*“”‘’«»„¿¡$£€¥#§%=&~`]|--+)""")
_SUFFIX = re.compile(r"""(?:\.\.+|…|[\"')\]}>*“”‘’«».,;:!?]|(?<=\d)%"""
                     r"""|(?<=\w)(?:n['’]t|['’](?:s|S|ll|re|ve|d|m))|--+)$""")
_INFIX = re.compile(r"(\.\.+|…|(?<=[^\W\d_])[-–—~](?=[^\W\d_])|(?<=[^\W\d_]),(?=[^\W\d_])"
                    r"|(?<=[^\W_])[:<>=/](?=[^\W\d_])|(?<=\d)[-+*^](?=[\d-])|(?<=[a-z])\.(?=[A-Z]))")
_URL = re.compile(r"(?:https?://|www\.)\S+?(?=[.,;:!?)\]\"']*$)")
_ABBREV_RE = re.compile(r"(?:[A-Za-z]\.){2,}|[A-Za-z]\.")
_TERMINAL = (".", "?", "!", '"', "'")
_CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
_SENTENCE_PUNCT = frozenset(  # spaCy's Sentencizer.default_punct_chars
    "!.?։؟۔܀܁܂߹।॥၊။።፧፨᙮᜵᜶᠃᠉᥄᥅᪨᪩᪪᪫᭚᭛᭞᭟᰻᰼᱾᱿‼‽⁇⁈⁉⸮⸼꓿꘎꘏꛳꛷꡶꡷꣎꣏꤯꧈꧉꩝꩞꩟꫰꫱꯫﹒﹖﹗！．？｡")
STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")
_PUNCT = frozenset(  # datatrove's PUNCTUATION: a word made only of these is a symbol, not a word
    "!/—”:％１〈&(、━\\【#%「」，】；+^]~“《„';’{|∶´[=-`*．（–？！：$～«〉,><》)?）。…@_.\"}►»·•‘")


def words(text: str) -> list[str]:
    """The words of ``text``, punctuation marks as their own words (as spaCy's English tokenizer)."""
    out: list[str] = []
    for chunk in text.split():
        if chunk.isalnum():  # the common case: a plain word
            out.append(chunk)
        else:
            _split_chunk(chunk, out)
    return out


def _split_chunk(chunk: str, out: list[str]) -> None:
    tail: list[str] = []
    while chunk:
        if chunk in _ABBREV or _ABBREV_RE.fullmatch(chunk):
            break
        if m := _URL.match(chunk):
            out.append(m.group())
            chunk = chunk[m.end():]
            continue
        if m := _PREFIX.match(chunk):
            out.append(m.group())
            chunk = chunk[m.end():]
            continue
        if m := _SUFFIX.search(chunk):
            if m.start() == 0:
                break
            tail.append(m.group())
            chunk = chunk[:m.start()]
            continue
        break
    if chunk:
        out.extend(p for p in _INFIX.split(chunk) if p)
    out.extend(reversed(tail))


def _is_symbol(word: str) -> bool:
    return all(ch in _PUNCT or not ch.isprintable() or ch.isspace() for ch in word)


class GopherQuality:
    """Gopher's quality rules (Rae et al. 2021, A.1.1), thresholds as the paper."""

    name = "gopher_quality"

    def __init__(self, min_doc_words: int | None = 50, max_doc_words: int | None = 100_000,
                 min_avg_word_length: float | None = 3, max_avg_word_length: float | None = 10,
                 max_symbol_word_ratio: float | None = 0.1, max_bullet_lines_ratio: float | None = 0.9,
                 max_ellipsis_lines_ratio: float | None = 0.3, min_alpha_words_ratio: float | None = 0.8,
                 min_stop_words: int | None = 2, stop_words: list[str] | None = None):
        self.min_doc_words, self.max_doc_words = min_doc_words, max_doc_words
        self.min_avg, self.max_avg = min_avg_word_length, max_avg_word_length
        self.max_symbol = max_symbol_word_ratio
        self.max_bullet, self.max_ellipsis_lines = max_bullet_lines_ratio, max_ellipsis_lines_ratio
        self.min_alpha = min_alpha_words_ratio
        self.min_stop = min_stop_words
        self.stop_words = frozenset(STOP_WORDS if stop_words is None else stop_words)

    def __call__(self, text: str) -> tuple[str | None, str | None]:
        ws = words(text)
        n = len(ws)
        real = [w for w in ws if not _is_symbol(w)]
        if self.min_doc_words and len(real) < self.min_doc_words:
            return None, "gopher_short_doc"
        if self.max_doc_words and len(real) > self.max_doc_words:
            return None, "gopher_long_doc"
        mean = sum(map(len, real)) / len(real) if real else 0.0
        if self.min_avg and mean < self.min_avg:
            return None, "gopher_below_avg_word_length"
        if self.max_avg and mean > self.max_avg:
            return None, "gopher_above_avg_word_length"
        if self.max_symbol and text.count("#") / n > self.max_symbol:
            return None, "gopher_too_many_hashes"
        if self.max_symbol and (text.count("...") + text.count("…")) / n > self.max_symbol:
            return None, "gopher_too_many_ellipsis"
        lines = text.splitlines() or [""]
        if self.max_bullet and sum(s.lstrip().startswith(("•", "-")) for s in lines) / len(lines) > self.max_bullet:
            return None, "gopher_too_many_bullets"
        if (self.max_ellipsis_lines
                and sum(s.rstrip().endswith(("...", "…")) for s in lines) / len(lines) > self.max_ellipsis_lines):
            return None, "gopher_too_many_end_ellipsis"
        if self.min_alpha and sum(any(c.isalpha() for c in w) for w in ws) / n < self.min_alpha:
            return None, "gopher_below_alpha_ratio"
        if self.min_stop and len(self.stop_words.intersection(ws)) < self.min_stop:
            return None, "gopher_few_stop_words"
        return text, None


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(number of repeated elements, their characters), first occurrences not counted."""
    seen: set[str] = set()
    n = chars = 0
    for x in items:
        if x in seen:
            n, chars = n + 1, chars + len(x)
        else:
            seen.add(x)
    return n, chars


def _top_ngram_chars(ws: list[str], n: int) -> int:
    """Characters covered by the most frequent n-gram (its length times its count)."""
    counts = Counter(tuple(ws[i:i + n]) for i in range(len(ws) - n + 1))
    gram, c = counts.most_common(1)[0]
    return (sum(map(len, gram)) + n - 1) * c  # joined with single spaces


def _dup_ngram_chars(ws: list[str], n: int) -> int:
    """Characters in n-grams that repeat an earlier one, non-overlapping (Gopher's definition)."""
    seen: set[tuple[str, ...]] = set()
    chars, i, end = 0, 0, len(ws) - n + 1
    while i < end:
        gram = tuple(ws[i:i + n])
        if gram in seen:
            chars += sum(map(len, gram))
            i += n
        else:
            seen.add(gram)
            i += 1
    return chars


class GopherRepetition:
    """Gopher's repetition rules (Rae et al. 2021, Table A1)."""

    name = "gopher_repetition"

    def __init__(self, dup_line_frac: float | None = 0.3, dup_para_frac: float | None = 0.3,
                 dup_line_char_frac: float | None = 0.2, dup_para_char_frac: float | None = 0.2,
                 top_n_grams=((2, 0.2), (3, 0.18), (4, 0.16)),
                 dup_n_grams=((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))):
        self.dup_line_frac, self.dup_para_frac = dup_line_frac, dup_para_frac
        self.dup_line_char_frac, self.dup_para_char_frac = dup_line_char_frac, dup_para_char_frac
        self.top_n_grams = [(int(n), float(f)) for n, f in top_n_grams]
        self.dup_n_grams = [(int(n), float(f)) for n, f in dup_n_grams]

    def __call__(self, text: str) -> tuple[str | None, str | None]:
        if not text:
            return None, "empty"
        size = len(text)
        paras = re.split(r"\n{2,}", text.strip())
        n, chars = _duplicates(paras)
        if self.dup_para_frac and n / len(paras) > self.dup_para_frac:
            return None, "dup_para_frac"
        if self.dup_para_char_frac and chars / size > self.dup_para_char_frac:
            return None, "dup_para_char_frac"
        lines = re.split(r"\n+", text)
        n, chars = _duplicates(lines)
        if self.dup_line_frac and n / len(lines) > self.dup_line_frac:
            return None, "dup_line_frac"
        if self.dup_line_char_frac and chars / size > self.dup_line_char_frac:
            return None, "dup_line_char_frac"
        ws = words(text)
        for n, frac in self.top_n_grams:
            if len(ws) >= n and _top_ngram_chars(ws, n) / size > frac:
                return None, f"top_{n}_gram"
        for n, frac in self.dup_n_grams:
            if _dup_ngram_chars(ws, n) / size > frac:
                return None, f"duplicated_{n}_grams"
        return text, None


def count_sentences(line: str) -> int:
    """Sentences in one line, as spaCy's rule-based sentencizer counts them: a sentence ends at a
    ".", "!" or "?" token and the next starts at the first following word that is not punctuation."""
    n, seen_end, any_token = 0, False, False
    for w in words(line):
        any_token = True
        if w in _SENTENCE_PUNCT:
            seen_end = True
        elif seen_end and not all(unicodedata.category(c).startswith("P") for c in w):
            n, seen_end = n + 1, False
    return n + any_token


class C4Quality:
    """C4's page rules (Raffel et al. 2020, 2.2; the TFDS ``c4_utils`` code): rewrites the page to
    its kept lines, or drops it."""

    name = "c4"

    def __init__(self, remove_citations: bool = True, filter_no_terminal_punct: bool = True,
                 min_num_sentences: int = 5, min_words_per_line: int = 3, max_word_length: int = 1000,
                 filter_lorem_ipsum: bool = True, filter_javascript: bool = True,
                 filter_curly_bracket: bool = True, filter_policy: bool = True):
        self.remove_citations, self.terminal = remove_citations, filter_no_terminal_punct
        self.min_sentences, self.min_words, self.max_word = min_num_sentences, min_words_per_line, max_word_length
        self.lorem, self.javascript = filter_lorem_ipsum, filter_javascript
        self.curly, self.policy = filter_curly_bracket, filter_policy

    def __call__(self, text: str) -> tuple[str | None, str | None]:
        sentences, kept = 0, []
        for line in text.splitlines():
            line = line.strip()
            ws = line.split()
            if self.max_word != -1 and any(len(w) > self.max_word for w in ws):
                continue
            if self.remove_citations:
                line = _CITATION.sub("", line)
            if self.terminal and (not line.endswith(_TERMINAL) or line.endswith("...")):
                continue
            if len(ws) < self.min_words:
                continue
            low = line.lower()
            if self.lorem and "lorem ipsum" in low:
                return None, "c4_lorem_ipsum"
            if self.javascript and "javascript" in low:
                continue
            if self.curly and "{" in line:
                return None, "c4_curly_bracket"
            if self.policy and any(p in low for p in _POLICY):
                continue
            if self.min_sentences != -1:
                sentences += count_sentences(line)
            kept.append(line)
        if sentences < self.min_sentences:
            return None, "c4_too_few_sentences"
        return "\n".join(kept).strip(), None


class MinLength:
    """Drop documents shorter than ``min_chars`` characters (after the other rewrites)."""

    name = "min_length"

    def __init__(self, min_chars: int = 1):
        self.min_chars = int(min_chars)

    def __call__(self, text: str) -> tuple[str | None, str | None]:
        return (text, None) if len(text.strip()) >= self.min_chars else (None, "too_short")


FILTERS: dict[str, Callable] = {"gopher_quality": GopherQuality, "gopher_repetition": GopherRepetition,
                                "c4": C4Quality, "min_length": MinLength}


def build(name: str, options: dict | bool | None = None):
    """One filter from its mixture name and options (``true`` or ``{}`` = defaults)."""
    if name not in FILTERS:
        raise OpenGemmaError(f"unknown filter {name!r}; known filters: {', '.join(FILTERS)}")
    opts = {} if options in (None, True) else options
    if not isinstance(opts, dict):
        raise OpenGemmaError(f"filter {name!r}: options must be true or a table of options, got {options!r}")
    try:
        return FILTERS[name](**opts)
    except TypeError as e:
        raise OpenGemmaError(f"filter {name!r}: {e}".replace("__init__() ", "")) from None
