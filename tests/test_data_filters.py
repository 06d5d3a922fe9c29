"""Heuristic quality filters (report "Filtering"; Gopher and C4 rules): each rule on a crafted
document that it must drop and a neighbour that it must keep. Agreement with datatrove's blocks on
the shared C4 slice is measured by bench/bench_data.py (bench/results/data-filters.md)."""

from __future__ import annotations

import pytest

from opengemma.data import filters as F
from opengemma.errors import OpenGemmaError

GOOD = ("The history of the river valley is long and varied. Farmers have worked the land for centuries, and "
        "the towns that grew along the banks traded grain, wool and timber with the cities of the coast. "
        "In the nineteenth century the railway arrived, and with it came new industries that changed the shape "
        "of every village. Today the valley is known for its orchards, its old stone bridges and the quiet "
        "walking paths that follow the water from the hills to the sea. Visitors come in every season.")


def test_words_split_like_spacy():
    assert F.words("I don't know, well-known U.S. e.g. $5.00 at 20:49... end.") == [
        "I", "do", "n't", "know", ",", "well", "-", "known", "U.S.", "e.g.", "$", "5.00", "at", "20:49", "...",
        "end", "."]


def test_good_document_passes_every_filter():
    for flt in (F.GopherQuality(), F.GopherRepetition(), F.C4Quality()):
        text, reason = flt(GOOD)
        assert reason is None and text == GOOD


@pytest.mark.parametrize("text, reason", [
    ("Too short to keep. " * 3, "gopher_short_doc"),
    (" ".join(["a b c d"] * 30), "gopher_below_avg_word_length"),
    (" ".join(["incomprehensibilities extraordinarily"] * 40), "gopher_above_avg_word_length"),
    (GOOD + " #tag" * 30, "gopher_too_many_hashes"),
    (GOOD + " and so on..." * 20, "gopher_too_many_ellipsis"),
    ("\n".join(f"- item number {i} of the list with the and to" for i in range(60)), "gopher_too_many_bullets"),
    ("\n".join("the story of the town and what it was..." for _ in range(6)) + "\n" + GOOD,
     "gopher_too_many_end_ellipsis"),
    (GOOD + " " + " ".join(["12345 67890 2468"] * 40), "gopher_below_alpha_ratio"),
    (" ".join(["alpha beta gamma delta epsilon zeta"] * 20), "gopher_few_stop_words"),
])
def test_gopher_quality_rules(text, reason):
    assert F.GopherQuality()(text) == (None, reason)


@pytest.mark.parametrize("text, reason", [
    ("\n\n".join(["The same paragraph again and again."] * 4 + ["A different one here."]), "dup_para_frac"),
    ("\n".join(["a repeated line of text", "another line", "a repeated line of text", "third line",
                "a repeated line of text", "a repeated line of text"]), "dup_line_frac"),
    ("buy now " * 40 + GOOD, "top_2_gram"),
    (GOOD + " " + " ".join(GOOD.split()[:40]) * 2, "duplicated_5_grams"),
])
def test_gopher_repetition_rules(text, reason):
    assert F.GopherRepetition()(text) == (None, reason)


def test_c4_keeps_only_good_lines():
    page = "\n".join(["Menu", "Home | About | Contact", GOOD, "Enable JavaScript to see the comments here.",
                      "By using this site you agree to our privacy policy and terms.", "Share this"])
    text, reason = F.C4Quality()(page)
    assert reason is None and text == GOOD


@pytest.mark.parametrize("page, reason", [
    (GOOD + "\nLorem ipsum dolor sit amet, consectetur adipiscing.", "c4_lorem_ipsum"),
    (GOOD + "\nfunction f() { return 1; } is the code we use.", "c4_curly_bracket"),
    ("One sentence only here. And a second one.\nA third sentence here.", "c4_too_few_sentences"),
])
def test_c4_page_rules(page, reason):
    assert F.C4Quality()(page) == (None, reason)


def test_sentence_count_follows_spacy_sentencizer():
    assert F.count_sentences("This is one. This is two! And three? Yes.") == 4
    assert F.count_sentences("Mr. Smith went to Washington on Nov. 8 with J. Doe.") == 1  # abbreviations
    assert F.count_sentences("Wait... what happened next") == 1  # an ellipsis does not end a sentence


def test_thresholds_are_options_and_bad_options_are_one_line():
    assert F.build("gopher_quality", {"min_doc_words": 5})("Short text but with the and of words here.")[1] is None
    with pytest.raises(OpenGemmaError, match="unknown filter 'gopher'"):
        F.build("gopher")
    with pytest.raises(OpenGemmaError, match="min_words"):
        F.build("c4", {"min_words": 3})
