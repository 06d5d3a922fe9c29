"""Runs one task of the benchmark suites on a loaded model and aggregates its metrics (report section
"Evaluation", Tables 6-8).

Multiple-choice tasks become :class:`~opengemma.eval.engine.LoglikRequest` lists (the few-shot
block is the shared prefix, computed once) scored as acc/acc_norm or by the task's ``aggregate``
(TruthfulQA MC2, BBQ bias scores, ...); generation tasks become batched greedy generations (or k
samples for maj@k / pass@k, or the task's own sampling settings for the toxicity benchmarks) scored
by the task's ``score`` per document or ``score_all`` over the run (offline classifiers). With
``chat`` both kinds are formatted as a user turn and a model turn by :func:`opengemma.chat.format_chat`.
The result is a plain dict: metrics with standard errors, n, shots, the generation settings, the
scorer, per-group details and the exact protocol and prompt format.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import ModuleType

from ..errors import OpenGemmaError
from . import metrics
from .engine import LoglikRequest, Scorer, generate_completions
from .tasks.base import DataSource, fixed_shots

FEWSHOT_DELIMITER = "\n\n"


def select_shots(task: ModuleType, doc: dict, pool: list[dict], k: int) -> list[dict]:
    if k <= 0:
        return []
    picker = getattr(task, "shots_for", None)
    shots = picker(doc, pool, k) if picker else fixed_shots(doc, pool, k)
    if len(shots) < k and not getattr(task, "INLINE_SHOTS", False):
        raise OpenGemmaError(f"{task.NAME}: only {len(shots)} few-shot examples available, {k} asked for")
    return shots


def fewshot_prefix(task: ModuleType, doc: dict, pool: list[dict], k: int) -> str:
    """Description + solved examples, each followed by the few-shot delimiter."""
    desc = task.description(doc) if hasattr(task, "description") else ""
    delim = getattr(task, "FEWSHOT_DELIMITER", FEWSHOT_DELIMITER)
    return desc + "".join(task.shot_text(s) + delim for s in select_shots(task, doc, pool, k))


def build_mc_requests(task: ModuleType, docs: list[dict], pool: list[dict], k: int, tokenizer, chat: bool = False):
    """(requests, items): the token-level requests and the task's MCItems, one per doc.

    Raw text: ``<bos>`` + few-shot block is the prefix, the item's context and continuation follow.
    Chat: the few-shot block and the context are one user turn, the continuation (without its
    leading space) opens the model turn; the prefix is then the longest run of tokens every item
    starts with, so the shared part is still computed once."""
    if chat:
        return _chat_mc_requests(task, docs, pool, k, tokenizer)
    prefix_ids: dict[str, tuple[int, ...]] = {}
    enc: dict[str, tuple[int, ...]] = {}

    def encode(text: str) -> tuple[int, ...]:
        if text not in enc:
            enc[text] = tuple(tokenizer.encode_plain(text))
        return enc[text]

    requests, items = [], []
    for doc in docs:
        text = fewshot_prefix(task, doc, pool, k)
        if text not in prefix_ids:
            prefix_ids[text] = (tokenizer.bos_id,) + tuple(tokenizer.encode_plain(text))
        item = task.to_mc(doc)
        items.append(item)
        requests.append(LoglikRequest.make(prefix_ids[text], [(encode(c), encode(t)) for c, t in item.pairs]))
    return requests, items


def _chat_mc_requests(task, docs, pool, k, tokenizer):
    from ..chat import format_chat

    rows, items = [], []
    for doc in docs:
        text = fewshot_prefix(task, doc, pool, k)
        item = task.to_mc(doc)
        items.append(item)
        rows.append([(tuple(format_chat(tokenizer, [{"role": "user", "content": text + c}]).ids),
                      tuple(tokenizer.encode_plain(t.lstrip(" ")) or tokenizer.encode_plain(t))) for c, t in item.pairs])
    first = rows[0][0][0]
    shared = min(len(ctx) for row in rows for ctx, _ in row)  # every context keeps >= 0 tokens of its own
    for row in rows:
        for ctx, _ in row:
            n = 0
            while n < shared and ctx[n] == first[n]:
                n += 1
            shared = n
    shared = max(shared, 1)  # at least <bos>
    requests = [LoglikRequest.make(first[:shared], [(ctx[shared:], cont) for ctx, cont in row]) for row in rows]
    return requests, items


def score_mc(items, results) -> dict:
    """acc / acc_norm per item from the engine's log-likelihoods -> aggregated metrics."""
    acc, acc_norm = [], []
    for item, res in zip(items, results):
        lls = [ll for ll, _ in res]
        p, pn = metrics.mc_predictions(lls, item.choices)
        acc.append(float(p == item.gold))
        acc_norm.append(float(pn == item.gold))
    out = {}
    for name, vals in (("acc", acc), ("acc_norm", acc_norm)):
        m, se = metrics.mean_stderr(vals)
        out[name], out[name + "_stderr"] = m, se
    return out


def run_task(gemma, task: ModuleType, source: DataSource, *, shots: int | None = None, limit: int | None = None,
             start: int = 0, batch_size: int = 16, samples: int | None = None, temperature: float | None = None,
             top_p: float | None = None, seed: int = 0, chat: bool = False, progress_factory: Callable | None = None,
             loaded: tuple | None = None, log_samples: bool = False) -> dict:
    """Evaluate ``task`` with ``gemma`` (an :class:`opengemma.Gemma`) on docs[start:start+limit];
    returns the result dict. ``samples``/``temperature``/``top_p`` None: the task's own settings
    (``SAMPLES``, ``TEMPERATURE``, ``TOP_P``), else greedy. ``loaded``: ``task.load(source)``'s
    result when the caller has it already. ``log_samples``: the result's ``"log"`` holds one
    record per document (its index, the model's outputs with their finish reasons and token counts,
    or its choices' log-likelihoods, and its score), as lm-eval's ``--log_samples``."""
    if hasattr(task, "check"):
        task.check()  # a missing scorer fails now, not after an hour of generation
    docs, pool, _ = loaded if loaded is not None else task.load(source)
    docs = docs[start:start + limit] if limit else docs[start:]
    if not docs:
        raise OpenGemmaError(f"{task.NAME}: no records")
    k = task.SHOTS if shots is None else shots
    bar = progress_factory(len(docs), task.NAME) if progress_factory else None
    tick = bar.update if bar else None
    t0 = time.monotonic()
    extra: dict = {}
    if task.KIND == "mc":
        chat = chat and getattr(task, "CHAT_FORMAT", True)
        requests, items = build_mc_requests(task, docs, pool, k, gemma.tokenizer, chat=chat)
        results = Scorer(gemma.model, batch_size=batch_size).score(requests, tick)
        if hasattr(task, "aggregate"):
            out, details = task.aggregate(docs, items, results)
        else:
            out, details = score_mc(items, results), {}
        if log_samples:
            extra["log"] = [_mc_log(i, item, res) for i, (item, res) in enumerate(zip(items, results))]
        example = gemma.tokenizer.decode(list(requests[0].prefix[1:]) + list(requests[0].pairs[0][0]))
    else:
        settings = sampling_settings(task, samples, temperature, top_p, seed)
        out, details, example, comps, scores = _run_generation(gemma, task, docs, pool, k, batch_size, settings,
                                                               chat, tick)
        samples = settings["samples"]
        flat = [c for cs in comps for c in cs]
        # How many samples ended by themselves (a stop token or string) rather than at the token cap.
        extra["generation"] = {**settings, "stopped": sum(c.finish_reason == "stop" for c in flat),
                               "generated": len(flat),
                               "mean_tokens": round(sum(c.completion_tokens for c in flat) / max(len(flat), 1), 2)}
        if log_samples:
            extra["log"] = [{"doc": i, "outputs": [c.text for c in cs], "finish": [c.finish_reason for c in cs],
                             "tokens": [c.completion_tokens for c in cs], **({"score": scores[i]} if scores else {})}
                            for i, cs in enumerate(comps)]
    if bar:
        bar.close()
    main = getattr(task, "MAIN", "acc")
    if "scorer" in details:
        extra["scorer"] = details["scorer"]
    return {"task": task.NAME, "n": len(docs), "shots": k, "metrics": out, "main_metric": main,
            "value": out.get(main), "stderr": out.get(main + "_stderr"), "protocol": task.PROTOCOL,
            "prompt_example": example, "samples": samples or 1, "chat": chat, **extra, "details": details,
            "wall_s": round(time.monotonic() - t0, 2)}


def sampling_settings(task: ModuleType, samples, temperature, top_p, seed) -> dict:
    """The generation settings of a run (recorded in its result): explicit values win, then the
    task's own (the toxicity benchmarks' published settings), then greedy -- or T=0.2 when several
    samples are asked for (maj@k, pass@k)."""
    n = samples if samples is not None else getattr(task, "SAMPLES", 1)
    temp = temperature if temperature is not None else getattr(task, "TEMPERATURE", None)
    if temp is None:
        temp = 0.2 if n > 1 else 0.0
    p = top_p if top_p is not None else getattr(task, "TOP_P", None)
    return {"samples": n, "temperature": temp, "top_p": p, "max_new_tokens": task.MAX_TOKENS,
            "stop": list(task.STOP), "seed": seed}


def _run_generation(gemma, task, docs, pool, k, batch_size, settings, chat, tick):
    tok = gemma.tokenizer
    samples = settings["samples"]
    prompts = []
    for doc in docs:
        text = task.prompt(doc, select_shots(task, doc, pool, k))
        if chat:
            from ..chat import format_chat

            ids = format_chat(tok, [{"role": "user", "content": text}], add_generation_prompt=True).ids
        else:
            ids = [tok.bos_id] + tok.encode_plain(text)
        prompts.append(ids)
    rep = [p for p in prompts for _ in range(samples)]
    counter = {"n": 0}

    def sub_tick(n):  # the bar counts documents, generation counts samples
        counter["n"] += n
        if tick and counter["n"] >= samples:
            tick(counter["n"] // samples)
            counter["n"] %= samples

    done = generate_completions(gemma.model, tok, rep, max_new_tokens=task.MAX_TOKENS, stop=task.STOP,
                                temperature=settings["temperature"], top_p=settings["top_p"],
                                seed=settings["seed"], batch_size=batch_size, progress=sub_tick)
    comps = [done[i * samples:(i + 1) * samples] for i in range(len(docs))]
    per_doc = [[c.text for c in cs] for cs in comps]
    example = tok.decode(prompts[0][1:]) if not chat else tok.decode(prompts[0])
    if hasattr(task, "score_all"):
        out, details = task.score_all(docs, per_doc)
        return out, details, example, comps, None
    values: dict[str, list[float]] = {}
    scores = []
    for doc, outs in zip(docs, per_doc):
        scores.append({name: float(v) for name, v in _score_doc(task, doc, outs).items()})
        for name, v in scores[-1].items():
            values.setdefault(name, []).append(v)
    out = {}
    for name, vals in values.items():
        m, se = metrics.mean_stderr(vals)
        out[name], out[name + "_stderr"] = m, se
    return out, {}, example, comps, scores


def _mc_log(i: int, item, res) -> dict:
    lls = [ll for ll, _ in res]
    p, pn = metrics.mc_predictions(lls, item.choices)
    return {"doc": i, "gold": item.gold, "loglikelihoods": [round(float(x), 5) for x in lls],
            "greedy": [bool(g) for _, g in res], "pred": p, "pred_norm": pn}


def _score_doc(task: ModuleType, doc: dict, outs: list[str]) -> dict:
    """One sample: the task's score. Several: its maj@k / pass@k scorer, else the mean over samples."""
    if len(outs) == 1:
        return task.score(doc, outs[0])
    if hasattr(task, "score_samples"):
        return task.score_samples(doc, outs)
    per = [task.score(doc, o) for o in outs]
    return {k: sum(p[k] for p in per) / len(per) for k in per[0]}
