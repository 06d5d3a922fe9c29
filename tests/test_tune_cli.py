"""``opengemma train sft|rm|rl|adapter|export`` and ``opengemma reward`` end to end on a tiny model
with Gemma's real tokenizer: runs, resume, export (LoRA merged, one embedding), ``--adapter`` at
generation time, and bad input as one clear line with a non-zero exit."""

from __future__ import annotations

import json

import pytest
import torch
from test_tune_helpers import one_thread  # noqa: F401 (fixture)

from opengemma.checkpoints import native
from opengemma.cli import main
from opengemma.config import PRESETS
from opengemma.testing import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = ["--seq-len", "128", "--micro-batch", "2", "--threads", "1", "--heldout-pct", "20"]


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer):
    """A tiny Gemma 3 with the real 262k vocabulary, as a native checkpoint directory."""
    d = tmp_path_factory.mktemp("base") / "tiny"
    cfg = PRESETS["tiny-gemma3"].replace(vocab_size=tokenizer.vocab_size, name="tiny-chat")
    native.save(d, cfg, tiny_model(cfg, std=0.02).state_dict(), tokenizer_model_bytes=tokenizer.model_bytes())
    return d


def _jsonl(path, recs, extra=""):
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n" + extra)
    return path


def _conv(i):
    return {"messages": [{"role": "user", "content": f"What is {i} + 1?"},
                         {"role": "assistant", "content": f"{i} + 1 = {i + 1}. The answer is {i + 1}."}]}


def test_sft_lora_export_adapter_generate_and_resume(tmp_path, base, capsys):
    # two files, read in order and mixed, their skips counted together
    data = _jsonl(tmp_path / "c.jsonl", [_conv(i) for i in range(12)] + [{"messages": [{"role": "wizard", "content": "x"}]}])
    data2 = _jsonl(tmp_path / "d.jsonl", [_conv(i) for i in range(12, 20)], "{broken\n")
    run = tmp_path / "run"
    args = ["train", "sft", "--model", str(base), "--data", str(data), str(data2), "--out", str(run), "--lora-rank", "4",
            "--max-steps", "2", "--filters", "selfid,dedup", "--lr", "1e-3", "--save-every", "1", *FAST]
    assert main(args) == 0
    info = json.loads((run / "run.json").read_text())
    assert info["kind"] == "lora" and info["lora"]["rank"] == 4
    rep = json.loads((run / "data_report.json").read_text())
    assert rep["read_skips"]["by_reason"] == {"unknown_role": 1, "bad_json": 1}
    assert rep["train_examples"] + rep["heldout_examples"] == 20
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2] and "val/loss" in recs[-1]
    # resume continues the run to step 3; a plain rerun refuses to overwrite it
    assert main(args) == 1 and "--resume" in capsys.readouterr().err
    assert main([*args[:args.index("--max-steps")], "--max-steps", "3", *args[args.index("--max-steps") + 2:],
                 "--resume"]) == 0
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3
    # a LoRA checkpoint holds the adapters (and their optimizer state), not the frozen base
    ckpt = run / "checkpoints" / "step_3"
    assert json.loads((ckpt / "meta.json").read_text())["weights"] == "trainable"
    base_bytes = sum(f.stat().st_size for f in base.rglob("*.safetensors"))
    assert sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()) < base_bytes / 10
    # export: a plain model directory with the adapter merged, one embedding tensor, the base's own
    assert main(["train", "export", str(run), str(tmp_path / "exp")]) == 0
    cfg, state = native.load(tmp_path / "exp")
    assert [k for k in state if "embed" in k] == ["embed.weight"] and not any("lora" in k for k in state)
    assert torch.equal(state["embed.weight"], native.load(base)[1]["embed.weight"])
    # a base whose weights changed since training is refused, not silently merged into
    info["base_fingerprint"] += 1.0
    (run / "run.json").write_text(json.dumps(info))
    capsys.readouterr()
    assert main(["train", "export", str(run), str(tmp_path / "exp2")]) == 1
    assert "has changed" in capsys.readouterr().err
    info["base_fingerprint"] -= 1.0
    (run / "run.json").write_text(json.dumps(info))
    assert main(["train", "adapter", str(run), str(tmp_path / "ad")]) == 0
    from opengemma.train import lora

    merged = lora.load_adapter(tiny_model(cfg), tmp_path / "ad")  # any base values: compare deltas
    assert not lora.lora_modules(merged)
    # --dtype bf16: half the bytes, and the same merge up to bf16 rounding of the adapter
    assert main(["train", "adapter", str(run), str(tmp_path / "ad16"), "--dtype", "bf16"]) == 0
    size = lambda d: (d / lora.ADAPTER_WEIGHTS).stat().st_size
    assert size(tmp_path / "ad16") < 0.6 * size(tmp_path / "ad")
    merged16 = lora.load_adapter(tiny_model(cfg), tmp_path / "ad16")
    for (k, a), b in zip(merged.state_dict().items(), merged16.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=0, msg=k)
    capsys.readouterr()
    assert main(["generate", "--model", str(base), "--adapter", str(tmp_path / "ad"), "hi", "-n", "3"]) == 0
    assert main(["generate", "--model", str(base), "--adapter", str(tmp_path), "hi", "-n", "3"]) == 1
    err = capsys.readouterr().err
    assert "not a LoRA adapter" in err and "Traceback" not in err


def _sized_pair(tokenizer, n: int) -> dict:
    """A preference record whose longer side is exactly ``n`` formatted tokens."""
    from opengemma.chat import format_chat

    for k in range(1, 400):
        rec = {"prompt": [{"role": "user", "content": "Say a."}],
               "chosen": [{"role": "assistant", "content": "a" + " a" * k}],
               "rejected": [{"role": "assistant", "content": "b"}]}
        if len(format_chat(tokenizer, rec["prompt"] + rec["chosen"], add_generation_prompt=False).ids) == n:
            return rec
    raise AssertionError(f"no {n}-token pair")


def test_rm_export_and_reward_scoring(tmp_path, base, tokenizer, capsys):
    pairs = [{"prompt": [{"role": "user", "content": f"Is {i} even?"}],
              "chosen": [{"role": "assistant", "content": "yes" if i % 2 == 0 else "no"}],
              "rejected": [{"role": "assistant", "content": "no" if i % 2 == 0 else "yes"}]} for i in range(16)]
    pairs.append({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: b"})
    pairs += [_sized_pair(tokenizer, 128), _sized_pair(tokenizer, 129)]  # --seq-len 128: the first fits, not the second
    data = _jsonl(tmp_path / "p.jsonl", pairs)
    run = tmp_path / "rm"
    assert main(["train", "rm", "--model", str(base), "--data", str(data), "--out", str(run), "--max-steps", "2",
                 "--center", "0.01", "--lora-rank", "2", "--dtype", "bf16", *FAST]) == 0  # LoRA: base held in bf16
    rep = json.loads((run / "rm_report.json").read_text())
    assert rep["skips"]["by_reason"] == {"identical_sides": 1, "overlong_dropped": 1} and "longer_wins" in rep["baselines"]
    assert rep["train_pairs"] + rep["heldout_pairs"] == 17
    assert main(["train", "export", str(run), str(tmp_path / "rmdir")]) == 0
    convs = _jsonl(tmp_path / "c.jsonl", [_conv(1), _conv(2)])
    capsys.readouterr()
    assert main(["reward", "--model", str(tmp_path / "rmdir"), "--data", str(convs)]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["line"] for x in lines] == [1, 2] and all(isinstance(x["reward"], float) for x in lines)
    assert main(["reward", "--model", str(base), "--data", str(convs)]) == 1
    assert "not a reward model" in capsys.readouterr().err


def test_rl_gsm8k_runs_and_bad_inputs_fail_cleanly(tmp_path, base, capsys):
    gsm = _jsonl(tmp_path / "g.jsonl", [{"question": f"What is {i} + 2?", "answer": f"{i} + 2 = {i + 2}\n#### {i + 2}"}
                                        for i in range(12)])
    run = tmp_path / "rl"
    assert main(["train", "rl", "--model", str(base), "--data", str(gsm), "--out", str(run), "--reward", "gsm8k",
                 "--algo", "grpo", "--max-steps", "1", "--group-size", "2", "--prompts-per-step", "2",
                 "--max-new-tokens", "4", "--eval-prompts", "2", "--lora-rank", "2", "--dtype", "bf16", *FAST]) == 0
    rec = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"reward", "kl", "logprob_gap"} <= set(rec) and (run / "rl.png").is_file()
    capsys.readouterr()
    bad = [
        ["train", "sft", "--model", str(base), "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "x")],
        ["train", "sft", "--model", str(base), "--data", str(_jsonl(tmp_path / "b.jsonl", [{"messages": []}])),
         "--out", str(tmp_path / "y")],
        ["train", "rl", "--model", str(base), "--data", str(gsm), "--out", str(tmp_path / "z"), "--reward", "nope"],
        ["train", "rl", "--model", str(base), "--data", str(_jsonl(tmp_path / "q.jsonl", [{"prompt": "hi"}])),
         "--out", str(tmp_path / "w"), "--reward", "gsm8k"],
    ]
    for argv in bad:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("opengemma: error:"), err
    assert not torch.is_inference_mode_enabled()


def test_adapter_default_without_a_shipped_adapter_is_one_line(capsys, tmp_path, monkeypatch):
    from opengemma.train import lora

    monkeypatch.setattr(lora, "SHIPPED_DIR", tmp_path)  # an install without the package data
    assert main(["generate", "--adapter", "default", "-n", "2", "hi"]) == 1
    err = capsys.readouterr().err
    assert "no default adapter ships" in err and "Traceback" not in err


def test_activation_checkpointing_changes_memory_not_results(tmp_path, base, monkeypatch):
    """``--activation-checkpointing`` (each block recomputed in backward) on SFT with LoRA, a full
    reward model and RL: the same losses and the same files as without it."""
    from safetensors.torch import load_file

    from opengemma.train import lora, parallel

    wrapped = []
    real = parallel.parallelize

    def spy(model, *a, **kw):
        out = real(model, *a, **kw)
        wrapped.append(sum(type(m).__name__ == "CheckpointWrapper" for m in model.layers))
        return out

    monkeypatch.setattr(parallel, "parallelize", spy)
    conv = _jsonl(tmp_path / "c.jsonl", [_conv(i) for i in range(16)])
    pairs = _jsonl(tmp_path / "p.jsonl", [{"prompt": [{"role": "user", "content": f"Is {i} even?"}],
                                           "chosen": [{"role": "assistant", "content": "yes" if i % 2 == 0 else "no"}],
                                           "rejected": [{"role": "assistant", "content": "no" if i % 2 == 0 else "yes"}]}
                                          for i in range(16)])
    gsm = _jsonl(tmp_path / "g.jsonl", [{"question": f"What is {i} + 2?", "answer": f"#### {i + 2}"} for i in range(12)])
    runs = {
        "sft": ["train", "sft", "--data", str(conv), "--lora-rank", "4", "--max-steps", "2", "--lr", "1e-3"],
        "rm": ["train", "rm", "--data", str(pairs), "--max-steps", "2", "--lr", "1e-4"],
        "rl": ["train", "rl", "--data", str(gsm), "--reward", "gsm8k", "--algo", "grpo", "--lora-rank", "4",
               "--max-steps", "2", "--group-size", "2", "--prompts-per-step", "2", "--max-new-tokens", "4",
               "--eval-prompts", "0", "--lr", "1e-3"],
    }
    for name, argv in runs.items():
        losses = []
        for ac in ([], ["--activation-checkpointing"]):
            run = tmp_path / f"{name}{len(ac)}"
            assert main([*argv, "--model", str(base), "--out", str(run), *FAST, *ac]) == 0, (name, ac)
            losses.append([json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()
                           if '"loss"' in x])
        assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-7), name
    assert wrapped == [PRESETS["tiny-gemma3"].n_layers] * 3  # once per flagged run, every block
    for d in ("sft0", "sft1"):
        assert main(["train", "adapter", str(tmp_path / d), str(tmp_path / f"ad-{d}")]) == 0
    a, b = (load_file(tmp_path / f"ad-{d}" / lora.ADAPTER_WEIGHTS) for d in ("sft0", "sft1"))
    assert sorted(a) == sorted(b) and not any("wrapped" in k for k in b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)
