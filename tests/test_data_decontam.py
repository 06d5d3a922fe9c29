"""Decontamination (opengemma.data.decontam): the index is built from `opengemma eval`'s task
registry; benchmark items planted into web text are all found and named, a clean control set is
untouched, tasks without data are reported, and the index survives a save/load (workers mmap it)."""

from __future__ import annotations

import importlib
import random
from pathlib import Path

import pytest

from opengemma.data import decontam
from opengemma.eval.tasks import TASKS
from opengemma.eval.tasks.base import DataSource
from opengemma.errors import OpenGemmaError

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
PLANT = ("gsm8k", "hellaswag", "arc_easy", "winogrande", "humaneval", "truthfulqa_mc2", "bbq_ambig", "toxigen")


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    folder = tmp_path_factory.mktemp("decontam")
    decontam.Index.build([FIXTURES]).save(folder)
    return decontam.Index.load(folder)


def _web(rng: random.Random, words: int = 120) -> str:
    vocab = ("the a of to and in is was for on with as by at from this that new city market people year time "
             "water house road music game team school price day night garden coffee travel").split()
    return " ".join(rng.choice(vocab) for _ in range(words)).capitalize() + "."


def _items(name: str) -> list[str]:
    task = importlib.import_module(TASKS[name])
    docs = task.load(DataSource([FIXTURES]))[0]
    return [decontam.item_texts(task, d)[0] for d in docs[:2]]


def test_every_registry_task_is_indexed_or_reported(index):
    assert [t.name for t in index.tasks] == list(TASKS)  # a task added to eval is picked up automatically
    for t in index.tasks:
        assert t.missing or t.items > 0, t.name
    assert index.lengths[0] == 13


def test_planted_items_are_found_and_named_clean_control_untouched(index):
    rng = random.Random(0)
    planted = []
    for name in PLANT:
        for text in _items(name):
            planted.append((name, _web(rng) + " " + text + " " + _web(rng)))
    for name, doc in planted:
        hits = index.find(doc)
        assert name in {t for t, _, _ in hits}, name
        assert all(len(g.split()) >= 8 for _, _, g in hits)
    control = [_web(rng, 400) for _ in range(200)]
    assert not any(index.find(doc) for doc in control)


def test_normalisation_ignores_case_punctuation_and_spacing(index):
    text = _items("gsm8k")[0]
    mangled = "  ".join(w.upper() + "," for w in text.split())
    assert "gsm8k" in {t for t, _, _ in index.find(mangled)}


def test_missing_data_is_reported_not_fatal(tmp_path):
    (tmp_path / "empty").mkdir()
    ix = decontam.Index.build([tmp_path / "empty", FIXTURES], tasks=["gsm8k", "mmlu"])
    by_name = {t.name: t for t in ix.tasks}
    assert by_name["gsm8k"].items > 0 and by_name["gsm8k"].missing is None
    ix = decontam.Index.build([tmp_path / "empty"], tasks=["gsm8k"])
    assert ix.tasks[0].missing and "gsm8k" in ix.tasks[0].missing and len(ix.hashes) == 0
    with pytest.raises(OpenGemmaError, match="none of the benchmark roots"):
        decontam.Index.build([tmp_path / "nope"])


def test_gram_hashes_are_positional():
    wh = decontam._word_hashes(decontam.normal_words("a b c d a b c"))
    g = decontam.gram_hashes(wh, 3)
    assert len(g) == 5 and g[0] == g[4] and len(set(g.tolist())) == 4
    assert len(decontam.gram_hashes(wh, 8)) == 0


def test_uninformative_ngrams_prove_nothing():
    assert not decontam.informative("0 0 0 0 0 0 0 0 0 0 0 0 0".split())
    assert not decontam.informative("1 2 3 4 5 6 7 8 9 10 11 12 13".split())
    assert not decontam.informative("the the the the the the the and and and and and and".split())
    assert decontam.informative("kylar went to the store to buy glasses for his new apartment one".split())
