"""Scorers of the evaluation harness (report section "Evaluation", Tables 5-6, "Memorization
Evaluations"): every pure function checked against hand-computed answers."""

from __future__ import annotations

import math
from itertools import combinations

import pytest

from opengemma.eval import metrics
from opengemma.eval.tasks import bbh, gsm8k, hellaswag, winogrande
from opengemma.eval.tasks import math as math_task


def test_acc_and_acc_norm_pick_different_choices():
    # raw: choice 0 (-4) beats choice 1 (-6); per character: -4/2 = -2 < -6/12 = -0.5, so acc_norm picks 1
    assert metrics.mc_predictions([-4.0, -6.0], ["ab", "abcdefghijkl"]) == (0, 1)
    assert metrics.mc_predictions([-1.0, -1.0], ["a", "b"]) == (0, 0)  # ties go to the first, as numpy.argmax


def test_mean_stderr_matches_lm_eval():
    m, se = metrics.mean_stderr([1, 0, 1, 1])
    assert m == 0.75
    assert se == pytest.approx(math.sqrt((3 * 0.0625 + 0.5625) / 3 / 4))  # sample variance / n


def _pass_at_k_brute(n, c, k):
    samples = [1] * c + [0] * (n - c)
    subsets = list(combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n,c,k", [(1, 0, 1), (1, 1, 1), (5, 2, 1), (5, 2, 3), (10, 1, 5), (10, 7, 4), (6, 0, 6)])
def test_pass_at_k_is_the_unbiased_estimator(n, c, k):
    assert metrics.pass_at_k(n, c, k) == pytest.approx(_pass_at_k_brute(n, c, k))


def test_pass_at_k_known_values_and_errors():
    assert metrics.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert metrics.pass_at_k(200, 10, 100) == pytest.approx(1 - math.comb(190, 100) / math.comb(200, 100))
    with pytest.raises(ValueError):
        metrics.pass_at_k(3, 4, 1)


def test_edit_distance_and_approximate_threshold():
    assert metrics.edit_distance("kitten", "sitting") == 3
    assert metrics.edit_distance([1, 2, 3], [1, 2, 3]) == 0
    assert metrics.edit_distance([], [1, 2]) == 2
    target = list(range(50))
    five_off = [-1] * 5 + target[5:]
    six_off = [-1] * 6 + target[6:]
    assert metrics.is_approximately_memorized(five_off, target)  # 5 <= 10% of 50
    assert not metrics.is_approximately_memorized(six_off, target)


def test_wilson_interval_known_values():
    lo, hi = metrics.wilson_interval(0, 100)
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(0.036995, abs=1e-5)
    lo, hi = metrics.wilson_interval(50, 100)
    assert (lo, hi) == (pytest.approx(0.403832, abs=1e-5), pytest.approx(0.596168, abs=1e-5))


def test_win_rate_splits_ties_and_has_a_normal_ci():
    r = metrics.win_rate(6, 2, 2)
    assert r["win_rate"] == pytest.approx(0.7)
    scores = [1] * 6 + [0.5] * 2 + [0] * 2
    _, se = metrics.mean_stderr(scores)
    assert r["ci95"] == (pytest.approx(0.7 - 1.959964 * se, abs=1e-6), pytest.approx(0.7 + 1.959964 * se, abs=1e-6))


def test_qa_normalisation_exact_match_and_f1():
    assert metrics.exact_match_any(" Sunset Blvd.", ["Sunset Boulevard", "sunset blvd"]) == 1.0
    assert metrics.exact_match_any("the Beatles", ["Beatles"], regexes_to_ignore=[r"\b(?:The |the |An |A |a |an )"]) == 1.0
    assert metrics.exact_match_any("Beatles band", ["Beatles"]) == 0.0
    assert metrics.f1_score("the cat sat", "a cat sat down") == pytest.approx(2 * 1 * (2 / 3) / (1 + 2 / 3))
    assert metrics.majority_vote(["3", None, "4", "3"]) == "3"
    assert metrics.majority_vote([None, None]) is None
    assert metrics.majority_vote(["4", "3"]) == "4"  # ties: first seen


def test_gsm8k_answer_extraction():
    doc = {"answer": "She makes 9 * 2 = $<<9*2=18>>18.\n#### 1,018"}
    assert gsm8k.gold(doc) == "1018"
    assert gsm8k.extract_strict("So 1,000 + 18 = 1018. The answer is 1,018.") == "1018"
    assert gsm8k.extract_strict("no final sentence 1018") is None
    assert gsm8k.extract_flexible("first 12 then $1,018.") == "1018"
    assert gsm8k.score(doc, "... The answer is 1,018.") == {"exact_match": 1.0, "flexible_extract": 1.0}
    # strict-match's regex has no '$' (as lm-eval): only the flexible filter finds "$1,018"
    assert gsm8k.score(doc, "... The answer is $1,018.") == {"exact_match": 0.0, "flexible_extract": 1.0}
    assert gsm8k.score_samples(doc, ["The answer is 1018.", "The answer is 7.", "The answer is 1018."])[
        "exact_match"] == 1.0


def test_math_extraction_and_minerva_normalisation():
    doc = {"solution": "So the answer is $\\boxed{\\frac{2}{3}}$."}
    assert math_task.gold(doc) == "\\frac{2}{3}"
    text = "We get 2/3.\nFinal Answer: The final answer is $\\frac{2}{3}$. I hope it is correct."
    assert math_task.extract(text) == "\\frac{2}{3}"
    assert math_task.score(doc, text)["exact_match"] == 1.0
    assert math_task.normalize_final_answer("\\text{(C)}") == "(C)"
    assert math_task.normalize_final_answer("10,000 dollars") == "10000"
    assert math_task.normalize_final_answer("x = \\frac12") == "\\frac{1}{2}"
    assert math_task.extract("no final answer") is None
    assert math_task.last_boxed_only_string("a \\boxed{x^{2}} b \\boxed{y}") == "\\boxed{y}"


def test_bbh_extraction_drops_the_final_period():
    assert bbh.extract("So the answer is (B).") == "(B)"
    assert bbh.score({"target": "No"}, "Step 1... So the answer is No.") == {"exact_match": 1.0}


def test_winogrande_partial_scoring_contexts():
    doc = {"sentence": "Sarah was better than Maria so _ got the easy cases.", "option1": "Sarah",
           "option2": "Maria", "answer": "2"}
    c1, c2, cont = winogrande.partial(doc)
    assert (c1, c2, cont) == ("Sarah was better than Maria so Sarah", "Sarah was better than Maria so Maria",
                              "got the easy cases.")
    item = winogrande.to_mc(doc)
    assert item.gold == 1 and item.pairs[0][1] == item.pairs[1][1] == " got the easy cases."


def test_hellaswag_preprocess():
    assert hellaswag.preprocess(" A man [title] is  here [step]. ") == "A man. is here ."  # lm-eval's exact steps
