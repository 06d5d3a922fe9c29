"""`opengemma train pretrain|export|plot` end to end on a tiny preset: kill-and-resume is bitwise
(a real subprocess SIGKILLed after a step, and once while a checkpoint is being written), the
export loads as a model, and bad input ends as one clear line with a non-zero exit and nothing lost.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from opengemma.cli import main
from opengemma.train.metrics import read_records
from opengemma.train.state import Checkpointer

ARGS = ["--model", "tiny-gemma1", "--seq-len", "32", "--micro-batch", "2", "--global-batch", "4", "--lr", "3e-3",
        "--max-steps", "6", "--save-every", "2", "--threads", "1", "--sample-tokens", "4", "--eval-every", "3"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    rnd = random.Random(0)
    words = "the cat sat on a mat and the dog ran to the big red house with a blue door".split()
    path = tmp_path_factory.mktemp("data") / "tiny.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(rnd.choice(words) for _ in range(rnd.randint(4, 30)))}) + "\n"
                            for _ in range(120)))
    return path


def pretrain(corpus, out, *extra, check=True):
    code = main(["train", "pretrain", "--data", str(corpus), "--out", str(out), *ARGS, *extra])
    if check:
        assert code == 0
    return code


def killed(corpus, out, fault):
    env = {**os.environ, "OPENGEMMA_TRAIN_FAULT": fault}
    proc = subprocess.run([sys.executable, "-m", "opengemma", "train", "pretrain", "--data", str(corpus), "--out",
                           str(out), *ARGS], env=env, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]


def trace(out):
    return [(r["step"], r["loss"], r["grad_norm"]) for r in read_records(out)]


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    pretrain(corpus, out)
    return out


def test_uninterrupted_run(reference):
    recs = read_records(reference)
    assert [r["step"] for r in recs] == list(range(1, 7)) and recs[-1]["loss"] < recs[0]["loss"]
    assert {"lr", "grad_norm", "tokens_per_s", "mfu", "loss/tiny"} <= set(recs[0])
    assert "val/loss" in recs[2] and "val/tiny" in recs[5]
    samples = read_records(reference, "samples.jsonl")
    assert [s["step"] for s in samples] == [3, 6] and samples[0]["text"].startswith("The")
    assert Checkpointer(reference).steps() == [4, 6]  # keep_last 2
    assert (reference / "loss.png").stat().st_size > 1000
    run = json.loads((reference / "run.json").read_text())
    assert run["kind"] == "pretrain" and run["model_config"]["n_layers"] == 2


@pytest.mark.parametrize("fault", ["kill_after_step:3", "kill_in_save:4"])
def test_kill_and_resume_is_bitwise(corpus, reference, tmp_path, fault):
    out = tmp_path / "run"
    killed(corpus, out, fault)
    ckpt = Checkpointer(out)
    assert ckpt.steps() == [2]
    if fault.startswith("kill_in_save"):
        assert (out / "checkpoints" / ".step_4.partial").is_dir()  # the write that was cut
    pretrain(corpus, out, "--resume")
    assert trace(out) == trace(reference)  # same data order, same floats
    assert not list((out / "checkpoints").glob(".*partial"))


def test_export_loads_as_a_model(reference, tmp_path, capsys):
    from opengemma.api import load
    from opengemma.model import GemmaModel
    from opengemma.train.state import load_model_weights

    run = json.loads((reference / "run.json").read_text())
    from opengemma.config import GemmaConfig

    trained = GemmaModel(GemmaConfig.from_dict(run["model_config"]))
    load_model_weights(Checkpointer(reference).latest(), trained)
    ids = torch.tensor([[2, 100, 101, 102]])
    want = trained.eval()(ids)
    for flag, name in (([], "native"), (["--hf"], "hf")):
        assert main(["train", "export", str(reference), str(tmp_path / name), *flag]) == 0
        g = load(str(tmp_path / name), device="cpu")
        assert torch.allclose(g.model(ids), want, atol=1e-5)
        assert g.tokenizer.vocab_size == run["model_config"]["vocab_size"]
    assert main(["generate", "--model", str(tmp_path / "native"), "-n", "3", "The"]) == 0
    assert main(["train", "plot", str(reference), "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").is_file()


def one_error_line(capsys, code, *needles, started=False):
    """Exit 1 and one error line (after the run's banner line when it had ``started``), no traceback."""
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == (2 if started else 1) and err[-1].startswith("opengemma: error:"), err
    for n in needles:
        assert n in err[-1], err[-1]


def test_bad_input(corpus, reference, tmp_path, capsys):
    one_error_line(capsys, pretrain(tmp_path / "missing", tmp_path / "r1", check=False), "no such data")
    (tmp_path / "notprepared").mkdir()
    one_error_line(capsys, pretrain(tmp_path / "notprepared", tmp_path / "r2", check=False), "manifest.json")
    one_error_line(capsys, pretrain(corpus, tmp_path / "r3", "--tp", "3", check=False), "do not split over --tp 3")
    one_error_line(capsys, pretrain(corpus, tmp_path / "r4", "--global-batch", "5", check=False), "multiple of 2")
    one_error_line(capsys, pretrain(corpus, tmp_path / "r5", "--resume", check=False), "nothing to resume")
    # an existing run is not overwritten without --resume
    one_error_line(capsys, pretrain(corpus, reference, check=False), "--resume")
    assert main(["train", "export", str(tmp_path / "nope"), str(tmp_path / "x")]) == 1
    capsys.readouterr()


def test_corrupt_and_mismatched_checkpoints(reference, corpus, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shard = next((Checkpointer(run).latest()).glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    one_error_line(capsys, pretrain(corpus, run, "--resume", "--max-steps", "8", check=False), "corrupt")
    # another model under the same run directory
    one_error_line(capsys, pretrain(corpus, reference, "--resume", "--max-steps", "8", "--model", "tiny-gemma2",
                                    check=False), "another model")


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    code = pretrain(corpus, out, "--lr", "1e30", "--grad-clip", "0", "--save-every", "1", "--warmup", "0",
                    "--schedule", "constant", check=False)
    one_error_line(capsys, code, "non-finite", "last good checkpoint", started=True)
    steps = Checkpointer(out).steps()
    assert steps and steps[-1] == len(read_records(out))  # every step logged was finite and checkpointed
    assert main(["train", "export", str(out), str(tmp_path / "x")]) == 0  # the last good one still exports


def test_prepared_mixture_directory(tmp_path):
    """--data DIR reads the staged mixture through the data pipeline's sampler: per-source train
    and validation losses, the directory's own tokenizer."""
    from opengemma.checkpoints.resolve import load_tokenizer, resolve
    from opengemma.config import PRESETS
    from opengemma.data.shards import build_shard_set

    g = torch.Generator().manual_seed(0)

    def docs(n, lo, hi):
        return [torch.randint(lo, hi, (int(torch.randint(5, 40, (1,), generator=g)),), generator=g).tolist()
                for _ in range(n)]

    tok = load_tokenizer(resolve("tiny-gemma1"), PRESETS["tiny-gemma1"])
    data = build_shard_set(tmp_path / "data", {"web": docs(60, 3, 200), "code": docs(60, 200, 500)},
                           heldout={"web": docs(8, 3, 200), "code": docs(8, 200, 500)}, bos=2, eos=1,
                           stages=[{"name": "main", "tokens": 2000, "weights": {"web": 0.8, "code": 0.2}},
                                   {"name": "anneal", "tokens": 2000, "weights": {"web": 0.2, "code": 0.8}}],
                           tokenizer={"file": "tokenizer.model", "vocab_size": tok.vocab_size, "bos_id": 2,
                                      "eos_id": 1, "pad_id": 0})
    (data / "tokenizer.model").write_bytes(tok.model_bytes())
    out = tmp_path / "run"
    assert main(["train", "pretrain", "--data", str(data), "--out", str(out), *ARGS, "--max-steps", "3",
                 "--sample-tokens", "0"]) == 0
    recs = read_records(out)
    assert {"loss/web", "loss/code", "val/web", "val/code", "val/loss"} <= set(recs[-1])
    assert json.loads((out / "run.json").read_text())["sources"] == ["web", "code"]
