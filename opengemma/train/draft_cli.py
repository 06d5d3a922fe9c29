"""``opengemma train draft``: an EAGLE draft head (:mod:`opengemma.draft`) trained on the target
model's own hidden states and next-token distributions, through the one training loop.

    opengemma train draft --model M --data FILE... --out RUN [--vocab 32768 --max-steps ...]

Self-distillation, EAGLE's recipe (Li et al., 2024): the frozen target runs (no gradient) over
packed rows of text, giving its final hidden state h_t at every position; the head reads
(h_t, x_{t+1}) and is trained to predict h_{t+1} (smooth-L1, averaged over the d features) and
the target's next-token distribution softmax(h_{t+1} E^T) restricted to the head's reduced
vocabulary (cross-entropy from the target's distribution, renormalised over those N tokens; the
log reports it as KL, 0 when matched). Loss per pair: ``feature_weight * smooth_l1 +
token_weight * CE`` (1.0 and 0.1, EAGLE's). The input states get uniform noise of
±``feature_noise`` x their RMS (EAGLE's augmentation: at drafting time the head reads its own,
imperfect, predictions). Pairs never straddle two documents.

Data: any mix of files the other runs read. JSONL records in a conversation format ``train sft``
takes (messages, prompt/completion, instructions, OpenAssistant trees) are formatted with
:func:`opengemma.chat.format_chat` (whole dialogues); any other file is read as documents, as
``train pretrain`` reads a small file (a line of text, or a JSONL record's ``text``). Everything
is packed into rows of ``--seq-len`` + 1 tokens; rows whose token hash falls in the lowest
``--heldout-pct`` percent are held out. The vocabulary is the ``--vocab`` ids most frequent in the
training rows.

Logged per step: ``feature_loss``, ``token_kl``, ``top1`` (the head's best token equals the
target's best within the reduced vocabulary). On held-out rows: the same, with ``val/top1``
against the target's argmax over its FULL vocabulary (the first draft's acceptance rate under
greedy decoding when the text is the model's own) and ``val/coverage`` (how often that argmax is
in the reduced vocabulary at all); and a real speculative greedy decode of ``--sample-tokens``
from ``--sample-prompt`` with the head, whose acceptance and tokens per forward are
``eval/acceptance`` and ``eval/tokens_per_forward``. The run ends by writing the head to
``RUN/draft`` (``opengemma generate --draft RUN/draft``); ``opengemma train export RUN DST`` writes
the head of any of its checkpoints.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..cli import float_range, int_range
from ..errors import OpenGemmaError

CHUNK_BUDGET = 64 * 2**20  # bytes of one [rows, N] fp32 logits block in the token loss
FULL_HEAD_ROWS = 128  # rows of full-vocabulary target logits at once (the held-out argmax)


def add_draft_parser(verbs) -> None:
    """Register ``draft`` on ``opengemma train``'s verbs."""
    from ..draft import DEFAULT_VOCAB
    from .tune_cli import _common

    d = verbs.add_parser("draft", help="train an EAGLE draft head for speculative decoding (--draft)",
                         description="Train a draft head for CHECKPOINT (default: the embedded 270M): one decoder "
                         "block over the model's own last hidden state and the next token's embedding, predicting "
                         "the model's next hidden state and, through the embedding rows of the --vocab most frequent "
                         "tokens, its next token (EAGLE, self-distilled: the frozen model's states and distributions "
                         "are the targets). DATA: JSONL conversations (any format `train sft` reads, chat-formatted) "
                         "or text (a document per line, or JSONL records' 'text'). Writes RUN/draft, used by "
                         "`opengemma generate|chat --draft RUN/draft --speculate K`.")
    _common(d, lr=1e-3, steps=2000, seq_len=512, micro=4, lora=False,
            data_help="training text: JSONL conversations or text files, .gz accepted, mixed (see above)")
    d.add_argument("--vocab", type=int_range(1), default=DEFAULT_VOCAB,
                   help=f"reduced vocabulary: the N token ids most frequent in the training rows (default {DEFAULT_VOCAB})")
    d.add_argument("--feature-weight", type=float_range(0.0), default=1.0,
                   help="weight of the smooth-L1 loss on the predicted hidden state (default 1.0)")
    d.add_argument("--token-weight", type=float_range(0.0), default=0.1,
                   help="weight of the cross-entropy to the model's next-token distribution (default 0.1)")
    d.add_argument("--feature-noise", type=float_range(0.0), default=0.1,
                   help="uniform noise of +-F x RMS added to the input hidden states (default 0.1; 0 = none)")
    d.add_argument("--val-rows", type=int_range(1), default=16, help="held-out rows evaluated (default 16)")
    d.add_argument("--sample-prompt", default="Write a short story about a lighthouse keeper.",
                   help="user turn of the held-out speculative decode (its acceptance is logged)")
    d.add_argument("--sample-tokens", type=int_range(0), default=48,
                   help="tokens of that decode (0 = none; default 48)")
    d.add_argument("--speculate", type=int_range(1, 64), default=4, help="drafts per forward of that decode (default 4)")
    d.set_defaults(train_run=run_draft)


# -- data ---------------------------------------------------------------------------------------------
def read_texts(paths) -> tuple[list[str], list[list[dict]], object, list[dict]]:
    """(documents, conversations, skips, per-file summary) of the ``--data`` files: a JSONL file
    holding conversations gives conversations (its unusable records counted in the skips),
    any other file documents."""
    from ..data.tokenize_train import read_documents
    from .prefs import Skips, read_conversations

    docs, convs, skips, files = [], [], Skips(), []
    for path in paths:
        name = Path(path).name.lower()
        found: list = []
        if name.endswith((".jsonl", ".jsonl.gz", ".json")):
            own = Skips()
            found, _ = read_conversations(path, own)
            if found:
                convs += found
                for reason, n in own.counts.items():
                    skips.counts[reason] += n
                    skips.examples.setdefault(reason, own.examples.get(reason, []))
                files.append({"path": str(path), "conversations": len(found), "skipped": own.total})
                continue
        found = list(read_documents(path))
        docs += found
        files.append({"path": str(path), "documents": len(found)})
    return docs, convs, skips, files


def make_rows(tok, docs: list[str], convs: list[list[dict]], seq_len: int, heldout_pct: float, skips):
    """(train rows, held-out rows, token count): documents ``[BOS] + text + [EOS]`` and formatted
    dialogues, packed into rows of ``seq_len + 1``; a row is held out by its token hash."""
    from ..chat import format_chat
    from ..data.packing import pack
    from .sft import in_heldout

    seqs = [[tok.bos_id] + tok.encode_plain(d) + [tok.eos_id] for d in docs]
    for i, conv in enumerate(convs):
        try:
            seqs.append(list(format_chat(tok, conv, add_generation_prompt=False).ids))
        except OpenGemmaError as e:
            skips.add("format_error", f"conversation {i}: {e}")
    rows = list(pack(seqs, seq_len))
    held = [r for r in rows if in_heldout(r.tokens, heldout_pct)]
    train = [r for r in rows if not in_heldout(r.tokens, heldout_pct)]
    if heldout_pct > 0 and not held and len(train) >= 2:
        held = [train.pop()]
    return train, held, sum(len(s) for s in seqs)


def token_counts(rows, vocab_size: int) -> torch.Tensor:
    """How often each token id occurs in ``rows`` (padding left out): [V] int64."""
    import numpy as np

    counts = np.zeros(vocab_size, dtype=np.int64)
    for r in rows:
        t, s = np.asarray(r.tokens), np.asarray(r.segment_ids)
        counts += np.bincount(t[s >= 0], minlength=vocab_size)[:vocab_size]
    return torch.from_numpy(counts)


# -- the model the loop trains, and its loss ----------------------------------------------------------
class DraftTraining(nn.Module):
    """The frozen target and the trainable head, as :func:`opengemma.train.loop.fit` sees them:
    only the head's weights require gradients, so checkpoints hold the head (and ``vocab_ids``)."""

    def __init__(self, target, head):
        super().__init__()
        self.target = target.requires_grad_(False)
        self.head = head
        self.config = target.config
        self._rows, self._rows_key = None, None

    def rows(self) -> torch.Tensor:
        """The target's embedding rows of the head's vocabulary [N, d] (gathered again when a
        resumed checkpoint replaced ``vocab_ids``)."""
        ids = self.head.vocab_ids
        key = (ids.data_ptr(), ids._version, ids.numel())
        if key != self._rows_key:
            with torch.no_grad():
                self._rows = self.target.embed(ids).float()
            self._rows_key = key
        return self._rows


def draft_pairs(model: DraftTraining, tokens: torch.Tensor, segment_ids: torch.Tensor, noise: float = 0.0):
    """(predicted states [N, d], the target's states [N, d]) of the pairs (h_t, x_{t+1}) of rows
    ``tokens`` [B, T] inside one document (``segment_ids`` [B, T], -1 padding)."""
    from ..draft import target_embeds

    target = model.target
    with torch.no_grad():
        h = target.trunk(tokens, segment_ids=segment_ids)  # [B, T, d]
        emb = target_embeds(target, tokens[:, 1:], target.final_norm.weight.dtype)  # [B, T-1, d]
    feats = h[:, :-1]  # [B, T-1, d]
    if noise:
        rms = feats.float().pow(2).mean(-1, keepdim=True).sqrt()  # [B, T-1, 1]
        feats = feats + ((torch.rand_like(feats, dtype=torch.float32) * 2 - 1) * noise * rms).to(feats.dtype)
    seg = segment_ids[:, :-1]  # [B, T-1]: pair t belongs to x_t's document
    pred = model.head(feats, emb, segment_ids=seg)  # [B, T-1, d]
    keep = (seg >= 0) & (seg == segment_ids[:, 1:])  # [B, T-1]: x_{t+1} in the same document
    return pred[keep], h[:, 1:][keep]


def _token_chunk(head, rows: torch.Tensor, pred: torch.Tensor, tgt: torch.Tensor):
    """(CE sum, KL sum, top-1 agreements) of one block of pairs: the head's reduced-vocabulary
    log-probs against the target's distribution over the same N tokens."""
    zq = head.logits(pred, rows)  # [n, N] fp32
    with torch.no_grad():
        zp = head.logits(tgt, rows)  # [n, N] fp32
        logp = torch.log_softmax(zp, dim=-1)
        p = logp.exp()
    logq = torch.log_softmax(zq, dim=-1)
    ce = -(p * logq).sum()
    with torch.no_grad():
        kl = ce.detach() + (p * logp).sum()  # CE - H(p)
        agree = (zq.argmax(-1) == zp.argmax(-1)).sum()
    return ce, kl, agree


def token_losses(head, rows: torch.Tensor, pred: torch.Tensor, tgt: torch.Tensor):
    """(CE sum, KL sum, agreements) over all pairs, in blocks of :data:`CHUNK_BUDGET` bytes of
    logits; under autograd each block is checkpointed (recomputed in backward), so memory holds
    one block of [rows, N] logits at a time, not one per pair."""
    from torch.utils.checkpoint import checkpoint

    n = max(1, CHUNK_BUDGET // (4 * rows.shape[0]))
    grad = torch.is_grad_enabled() and pred.requires_grad
    ce = pred.new_zeros((), dtype=torch.float32) + 0.0 * pred.sum()  # keeps the graph when no pair
    kl = torch.zeros((), dtype=torch.float64, device=pred.device)
    agree = torch.zeros((), dtype=torch.int64, device=pred.device)
    for s in range(0, pred.shape[0], n):
        args = (head, rows, pred[s:s + n], tgt[s:s + n])
        c, k, a = checkpoint(_token_chunk, *args, use_reentrant=False) if grad else _token_chunk(*args)
        ce, kl, agree = ce + c, kl + k, agree + a
    return ce, kl, agree


def draft_loss(feature_weight: float, token_weight: float, noise: float):
    """The loss function of :func:`opengemma.train.loop.fit` for a :class:`DraftTraining` model."""
    from .losses import LossOutput
    from .parallel import device_of

    def loss_fn(model, batch):
        dev = device_of(model)
        pred, tgt = draft_pairs(model, batch.tokens.to(dev), batch.segment_ids.to(dev), noise)  # [N, d] each
        feat = F.smooth_l1_loss(pred.float(), tgt.float(), reduction="none").mean(-1).sum()
        ce, kl, agree = token_losses(model.head, model.rows(), pred, tgt)
        loss = feature_weight * feat + token_weight * ce
        return LossOutput(loss, pred.shape[0], {"feature_loss": feat.detach(), "token_kl": kl, "top1": agree})

    return loss_fn


def make_eval_fn(heldout, micro: int, tok, prompt: str, n_tokens: int, k: int):
    """Held-out metrics (module docstring) and a speculative decode with the head as it stands."""
    from ..chat import format_chat
    from ..draft import EagleDrafter
    from ..generate import GenerationConfig, GenerationStats, generate
    from .data import collate
    from .parallel import device_of

    def eval_fn(model, step):
        out: dict = {}
        dev = device_of(model)
        sums = {"feature_loss": 0.0, "token_kl": 0.0, "top1_reduced": 0.0, "top1": 0.0, "coverage": 0.0}
        count = 0
        ids = model.head.vocab_ids
        for i in range(0, len(heldout), micro):
            b = collate(heldout[i:i + micro], ())
            pred, tgt = draft_pairs(model, b.tokens.to(dev), b.segment_ids.to(dev))
            if not pred.shape[0]:
                continue
            _, kl, agree = token_losses(model.head, model.rows(), pred, tgt)
            sums["feature_loss"] += float(F.smooth_l1_loss(pred.float(), tgt.float(), reduction="none").mean(-1).sum())
            sums["token_kl"] += float(kl)
            sums["top1_reduced"] += int(agree)
            for s in range(0, pred.shape[0], FULL_HEAD_ROWS):  # the target's argmax over its whole vocabulary
                best = model.target.head(tgt[s:s + FULL_HEAD_ROWS]).argmax(-1)  # [n]
                mine = ids[model.head.logits(pred[s:s + FULL_HEAD_ROWS], model.rows()).argmax(-1)]  # [n]
                sums["top1"] += int((mine == best).sum())
                sums["coverage"] += int(torch.isin(best, ids).sum())
            count += pred.shape[0]
        if count:
            out.update({f"val/{k_}": v / count for k_, v in sums.items()})
        if n_tokens:
            stats = GenerationStats()
            chat = format_chat(tok, [{"role": "user", "content": prompt}]).ids
            drafter = EagleDrafter(model.head, model.target)
            done = generate(model.target, tok, [chat], GenerationConfig(max_new_tokens=n_tokens, speculate=k),
                            drafter=drafter, stats=stats)
            out["sample"] = done[0].text
            if stats.acceptance is not None:
                out["eval/acceptance"] = stats.acceptance
            if stats.tokens_per_forward is not None:
                out["eval/tokens_per_forward"] = stats.tokens_per_forward
        return out

    return eval_fn


# -- the run --------------------------------------------------------------------------------------------
def run_draft(args) -> int:
    from ..draft import EagleHead, frequent_ids, save_draft
    from .cli import read_run_json
    from .data import RowBatches, RowStream
    from .loop import fit
    from .tune_cli import _finish, _start, _train_config, _write_json

    docs, convs, skips, files = read_texts(args.data)  # before the model: a bad file fails fast
    if not docs and not convs:
        raise OpenGemmaError(f"{' '.join(args.data)}: no text or conversation to train on")
    settings = {"vocab": args.vocab, "feature_weight": args.feature_weight, "token_weight": args.token_weight,
                "feature_noise": args.feature_noise}
    target, tok, _, _, run_dir, dev = _start(args, "draft", {"draft": settings})
    was = (read_run_json(run_dir).get("draft") or {}) if args.resume else settings
    if was.get("vocab") != args.vocab:
        raise OpenGemmaError(f"{run_dir} was trained with --vocab {was.get('vocab')}: resume with the same")
    cfg = _train_config(args).resolved(1)
    train, held, n_tokens = make_rows(tok, docs, convs, cfg.seq_len, args.heldout_pct, skips)
    counts = token_counts(train, target.config.vocab_size)
    ids = frequent_ids(counts, args.vocab)
    coverage = float(counts[ids].sum()) / max(1, int(counts.sum()))
    report = {"files": files, "skips": skips.to_dict(), "documents": len(docs), "conversations": len(convs),
              "tokens": n_tokens, "train_rows": len(train), "heldout_rows": len(held), "seq_len": cfg.seq_len,
              "vocab": len(ids), "vocab_token_coverage": coverage,
              "heldout_rule": f"blake2b-64(row token ids) < {args.heldout_pct}% of 2**64"}
    _write_json(run_dir / "data_report.json", report)
    print(f"draft data: {len(docs)} documents, {len(convs)} conversations (skipped: {skips.summary()}), "
          f"{n_tokens:,} tokens in {len(train)} train / {len(held)} held-out rows of {cfg.seq_len}; vocabulary: "
          f"the {len(ids):,} most frequent ids, {coverage:.1%} of the training tokens", file=sys.stderr)
    head = EagleHead(target.config, ids).init_weights(torch.Generator().manual_seed(args.seed)).to(dev)
    model = DraftTraining(target, head)
    n_params = sum(p.numel() for p in head.parameters())
    source = RowBatches(RowStream(train, cfg.seed), global_batch=cfg.global_batch, micro_batch=cfg.micro_batch)
    result = fit(model, source, draft_loss(args.feature_weight, args.token_weight, args.feature_noise), cfg, run_dir,
                 resume=args.resume, meta={"kind": "draft"},
                 eval_fn=make_eval_fn(held[:args.val_rows], cfg.micro_batch, tok, args.sample_prompt,
                                      args.sample_tokens, args.speculate),
                 banner=f"draft head for {target.config.name}: {n_params:,} trainable parameters, "
                        f"vocabulary {len(ids):,}")
    info = {"target": read_run_json(run_dir).get("model"), "run": str(run_dir.resolve()), "step": result.step,
            "train": settings, "metrics": {k: v for k, v in result.record.items()
                                           if k.startswith(("val/", "eval/")) and isinstance(v, (int, float))},
            "command": ["opengemma", *sys.argv[1:]]}
    dst = save_draft(run_dir / "draft", model.head, info=info)
    _finish(run_dir, result, "draft head")
    print(f"draft head in {dst}: opengemma generate --draft {dst} --speculate 4 ...", file=sys.stderr)
    return 0


def export_run(run_dir, run: dict, checkpoint, dst, *, hf: bool = False, dtype=torch.float32) -> Path:
    """``opengemma train export`` of a draft run: the head of ``checkpoint`` as a draft directory."""
    from ..config import GemmaConfig
    from ..draft import EagleHead, save_draft
    from .state import load_model_weights

    if hf:
        raise OpenGemmaError("a draft head has no Hugging Face layout: export it without --hf")
    holder = nn.Module()  # the run's module names ("head.*") without the frozen target
    n = int((run.get("draft") or {}).get("vocab", 0))
    config = GemmaConfig.from_dict(run["model_config"])
    holder.head = EagleHead(config, torch.arange(min(n, config.vocab_size) or 1))
    load_model_weights(Path(checkpoint), holder)
    info = {"target": run.get("model"), "run": str(Path(run_dir).resolve()), "checkpoint": str(checkpoint),
            "train": run.get("draft")}
    return save_draft(dst, holder.head, info=info, dtype=dtype)
