"""`opengemma data prepare` end to end on a small mixture (opengemma.data.pipeline): filters,
PII, exact and near dedup, decontamination, held-out split, shards + manifest + data card; a
resumed run redoes only unfinished tasks; bad input is one line and exit status 1, with nothing
left that looks complete."""

from __future__ import annotations

import importlib
import json
import random
from pathlib import Path

import pytest

from opengemma.cli import main
from opengemma.data import pipeline
from opengemma.data.shards import ShardSet
from opengemma.eval.tasks import TASKS
from opengemma.eval.tasks.base import DataSource

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
NOUNS = "river city market garden school teacher farmer bridge harbor library village station museum".split()
VERBS = "visited built opened crossed painted repaired described watched followed".split()
ADJS = "old quiet busy narrow green famous small northern".split()


def _doc(rng: random.Random, sentences: int = 8) -> str:
    out = []
    for _ in range(sentences):
        out.append(f"The {rng.choice(ADJS)} {rng.choice(NOUNS)} {rng.choice(VERBS)} the {rng.choice(NOUNS)} of the "
                   f"{rng.choice(NOUNS)} and {rng.choice(VERBS)} it with the {rng.choice(ADJS)} {rng.choice(NOUNS)}"
                   f" {rng.randrange(1, 300)} times.")
    return " ".join(out)


def _gsm8k_question() -> str:
    task = importlib.import_module(TASKS["gsm8k"])
    return task.load(DataSource([FIXTURES]))[0][0]["question"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    web = [_doc(rng) for _ in range(30)]
    special = {
        "ssn": _doc(rng) + " His social security number is 123-45-6789 as stated.",
        "email": _doc(rng) + " Write to jane.doe@example.org for details.",
        "planted": _doc(rng) + " " + _gsm8k_question() + " " + _doc(rng, 3),
        "short": "Buy now!",
    }
    near = web[1].split()
    near[20] = "lighthouse"  # one word changed: Jaccard ~0.9 on 5-word shingles
    lines = web + list(special.values()) + [web[0], " ".join(near)]  # + an exact and a near duplicate
    (root / "web.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines), encoding="utf-8")
    (root / "wiki.txt").write_text("\n".join(_doc(rng, 12) for _ in range(6)) + "\n", encoding="utf-8")
    (root / "tokenizer.model").write_bytes(tokenizer.model_bytes())
    mix = f"""
name = "test"
tokenizer = "tokenizer.model"
workers = 1
shard_tokens = 4096
[sources.web]
paths = ["web.jsonl"]
filters = ["gopher_quality"]
toxicity = 0.99
heldout = 0.1
[sources.wiki]
paths = ["wiki.txt"]
[pii]
sensitive = "drop"
personal = "redact"
[decontam]
roots = ["{FIXTURES}"]
[[stages]]
name = "main"
tokens = 50000
weights = {{web = 0.8, wiki = 0.2}}
[[stages]]
name = "anneal"
tokens = 5000
ramp_tokens = 1000
weights = {{web = 0.5, wiki = 0.5}}
"""
    (root / "mix.toml").write_text(mix, encoding="utf-8")
    return root, special, web


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    root, _, _ = corpus
    out = tmp_path_factory.mktemp("out")
    lines = []
    manifest = pipeline.prepare(root / "mix.toml", out, log=lines.append)
    return out, manifest, lines


def test_manifest_shards_and_card(prepared, tokenizer):
    out, manifest, _ = prepared
    assert (out / "manifest.json").is_file() and (out / "report.md").is_file()
    ss = ShardSet.open(out, verify=True)
    web = ss.source("web")
    texts = [tokenizer.decode(web.doc(i)[1:-1].tolist()) for i in range(web.num_docs)]
    held = ss.source("web", "heldout")
    texts += [tokenizer.decode(held.doc(i)[1:-1].tolist()) for i in range(held.num_docs)]
    assert all(int(web.doc(i)[0]) == tokenizer.bos_id and int(web.doc(i)[-1]) == tokenizer.eos_id
               for i in range(web.num_docs))
    report = json.loads((out / "report.json").read_text())
    steps = report["sources"]["web"]["steps"]
    assert steps["read"]["docs_in"] == 36
    assert steps["gopher_quality"]["removed"] == {"gopher_short_doc": 1}
    assert steps["decontam"]["removed"] == {"benchmark_overlap": 1}
    assert report["sources"]["web"]["contamination"]["gsm8k"]["docs"] == 1
    assert steps["pii"]["removed"] == {"pii_sensitive": 1}
    assert steps["exact_dedup"]["removed"] == {"exact_duplicate": 1}
    assert steps["near_dedup"]["removed"] == {"near_duplicate": 1}
    assert len(texts) == 36 - 5  # short, planted, ssn, exact and near duplicate removed
    assert not any("123-45-6789" in t for t in texts)  # sensitive data never reaches the shards
    assert any("Write to [EMAIL] for details." in t for t in texts)
    assert not any("jane.doe" in t for t in texts)
    assert manifest["sources"]["web"]["tokens"] + manifest["sources"]["web"]["heldout_tokens"] == sum(
        len(tokenizer.encode_plain(t)) + 2 for t in texts)
    assert [s["name"] for s in manifest["stages"]] == ["main", "anneal"]
    assert manifest["stages"][1]["ramp_tokens"] == 1000
    assert report["stages"][0]["sources"]["web"]["target_tokens"] == 40000
    assert "gsm8k" in (out / "report.md").read_text()


def test_resume_redoes_only_unfinished_tasks(prepared, corpus):
    out, manifest, _ = prepared
    root = corpus[0]
    (out / "manifest.json").unlink()
    (out / "work" / "logs" / "tokenize" / "completions" / "00000").unlink()  # as if killed mid-task
    lines = []
    again = pipeline.prepare(root / "mix.toml", out, log=lines.append)
    assert again["sources"] == manifest["sources"]
    assert any(line.startswith("filter: 2 task(s), 2 done before") for line in lines)
    assert any(line.startswith("tokenize: 2 task(s), 1 done before") for line in lines)
    lines.clear()
    pipeline.prepare(root / "mix.toml", out, log=lines.append)
    assert "already complete" in lines[0]


def _run(capsys, *argv) -> tuple[int, str]:
    """Exit status and the error line (progress lines before it are fine; a traceback is not)."""
    rc = main(["data", *map(str, argv)])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("opengemma: error:")]
    assert len(errors) == 1 and err.rstrip("\n").endswith(errors[0]), err
    return rc, errors[0]


@pytest.mark.parametrize("edit, message", [
    (("weights = {web = 0.8, wiki = 0.2}", "weights = {web = 0.8, wikki = 0.2}"), "unknown source 'wikki'"),
    (("weights = {web = 0.8, wiki = 0.2}", "weights = {web = 0.8, wiki = 0.3}"), "weights sum to 1.1, not 1"),
    (("tokens = 50000\n", ""), "stage 'main' has no token budget"),
    (('paths = ["web.jsonl"]', 'paths = ["nope.jsonl"]'), "nope.jsonl: no such file or folder"),
    (('[pii]\nsensitive = "drop"', '[pii]\nsensitive = "keep"'), "must never reach the shards"),
    (("toxicity = 0.99", "toxicity = 2"), "toxicity must be a number in [0.0, 1.0]"),
    (("heldout = 0.1", "heldout = 0.1\ncolour = 1"), "unknown key 'colour' in [sources.web]"),
])
def test_malformed_mixture_is_one_line(corpus, tmp_path, capsys, edit, message):
    root = corpus[0]
    text = (root / "mix.toml").read_text().replace(*edit)
    bad = root / f"bad-{abs(hash(edit))}.toml"
    bad.write_text(text)
    rc, err = _run(capsys, "prepare", "--mixture", bad, "--output", tmp_path / "o")
    assert rc == 1 and message in err, err
    assert not (tmp_path / "o" / "manifest.json").exists()


@pytest.mark.parametrize("content, message", [
    (b'{"text": "fine"}\n{"text": broken\n', "not valid JSON"),
    (b'{"text": "fine"}\n{"body": "no text field"}\n', "no 'text' field"),
    (b'{"text": "caf\xe9"}\n', "not UTF-8"),
])
def test_bad_input_file_is_one_line_and_nothing_complete(corpus, tmp_path, capsys, content, message):
    root = corpus[0]
    (tmp_path / "web.jsonl").write_bytes(content)
    (tmp_path / "wiki.txt").write_text("A line of text here.\n")
    (tmp_path / "tokenizer.model").write_bytes((root / "tokenizer.model").read_bytes())
    (tmp_path / "mix.toml").write_text((root / "mix.toml").read_text())
    rc, err = _run(capsys, "prepare", "--mixture", tmp_path / "mix.toml", "--output", tmp_path / "o", "-j", 1)
    assert rc == 1 and message in err, err
    assert not (tmp_path / "o" / "manifest.json").exists()
    assert not list((tmp_path / "o" / "work" / "filtered").glob("*.jsonl.gz"))  # no half-written output


def test_missing_mixture_file(tmp_path, capsys):
    rc, err = _run(capsys, "prepare", "--mixture", tmp_path / "none.toml", "--output", tmp_path / "o")
    assert rc == 1 and "none.toml: no such file" in err


def test_quality_train_cli(corpus, tmp_path, capsys):
    root = corpus[0]
    rc = main(["data", "quality-train", "--positive", str(root / "wiki.txt"), "--negative", str(root / "web.jsonl"),
               "--output", str(tmp_path / "q.npz"), "--window", "16", "--heldout", "0.3"])
    out = capsys.readouterr().out
    assert rc == 0 and "held-out precision" in out
    from opengemma.data.quality import QualityModel

    model = QualityModel.load(tmp_path / "q.npz")
    assert 0.0 <= model.info["heldout_precision"] <= 1.0


def test_tokenizer_override(corpus, tmp_path, capsys):
    """--tokenizer replaces the mixture's tokenizer (a folder from `tokenizer train` is accepted),
    and a missing one is one line before any work."""
    from opengemma.data import mixture

    root = corpus[0]
    assert mixture.tokenizer_path(root) == str((root / "tokenizer.model").resolve())
    assert mixture.tokenizer_path("embedded") == "embedded"
    rc, err = _run(capsys, "prepare", "--mixture", root / "mix.toml", "--output", tmp_path / "o",
                   "--tokenizer", tmp_path / "nope")
    assert rc == 1 and "--tokenizer" in err and "no such file" in err
    assert not (tmp_path / "o" / "manifest.json").exists()
