"""A trained draft head for speculative decoding: EAGLE (Li et al., 2024) with a reduced vocabulary.

Prompt lookup (:class:`opengemma.speculative.PromptLookupDrafter`) only pays where the text
repeats itself. A draft head predicts what the target model itself would write next, from the
target's own last hidden state:

    fused    = fc([embed(x_{t+1}) * sqrt(d); h_t])      # 2d -> d, the target's frozen tied embedding
    h'_{t+1} = block(fused)                               # ONE Gemma decoder block, its own KV cache
    logits   = h'_{t+1} @ E[ids]^T                        # the N most frequent tokens' embedding rows

``h_t`` is the target's final-normed hidden state (:meth:`GemmaModel.trunk`) at position t and
``x_{t+1}`` the token that followed; the head predicts the target's next hidden state, and from it
the next token. Drafting k tokens runs the head k times, feeding each predicted state and drafted
token back in; a verification forward of the target (:mod:`opengemma.speculative`) then gives the
true hidden states of the accepted positions, which replace the predicted ones. As in EAGLE the
block's residual stream is the prediction, with no norm after it, and the head starts as the
identity h'_{t+1} = h_t (:meth:`EagleHead.init_weights` says why).

* **Reduced vocabulary** (as in frequency-ranked drafting, FR-Spec): the head scores only the N
  (default 32,768) token ids most frequent in its training text, ranked by count, through the
  target's own embedding rows: a draft step reads N x d of the head, not the 262,144 x d the
  target's head reads. The rows are the target's (frozen); only the id list is stored.
* **Trainable weights**: ``fc`` and the block (6.4M for the 270M, a 16th of its trunk; a draft
  step costs ~11% of a target step in bf16, see :mod:`opengemma.speculative`). Trained by ``opengemma train draft`` (:mod:`opengemma.train.draft_cli`) on the target's
  own hidden states and next-token distributions.
* **Its own KV cache**: one global layer (pair t = (h_t, x_{t+1}) at position t), holding only
  pairs built from the target's real hidden states; the pairs of a round of drafting are rolled
  back (:meth:`KVCache.forget`) as soon as the drafts are out, so a rejection leaves nothing to
  undo and the cache always reads as teacher-forced drafting over the accepted text.
* **Sampling**: at temperature > 0 drafts are drawn from the head's own distribution q (the same
  temperature / top-k / top-p applied to its reduced-vocabulary logits), and verification uses
  the general rule min(1, p/q) with residual norm(max(0, p - q)) (:func:`opengemma.speculative.verify`):
  lossless for any q, and a q close to p is accepted more often than a one-hot guess.

A head is saved as a directory: ``draft.safetensors`` (its weights and ``vocab_ids``) and
``draft_config.json`` (format, the target's config for the compatibility check, training info).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention_mask
from .cache import KVCache
from .config import GLOBAL, GemmaConfig
from .errors import OpenGemmaError
from .model import Block, GemmaModel, segment_positions
from .sampling import draw, sampling_probs

FORMAT = "opengemma-draft-head"
VERSION = 1
CONFIG_FILE = "draft_config.json"
WEIGHTS_FILE = "draft.safetensors"
DEFAULT_VOCAB = 32_768


def draft_config(target: GemmaConfig) -> GemmaConfig:
    """The head's one-block config: the target's layer shapes, one global layer."""
    return target.replace(name=f"{target.name}-draft", n_layers=1, layer_types=(GLOBAL,))


def embed_scale(d_model: int, dtype: torch.dtype) -> float:
    """sqrt(d_model) rounded to the activation dtype, as :meth:`GemmaModel.trunk` scales embeddings."""
    return torch.tensor(math.sqrt(d_model), dtype=dtype).item()


class EagleHead(nn.Module):
    """The draft head's own weights (``fc``, ``block``) and its vocabulary ``vocab_ids``
    [N] (int64, most frequent first). The target's embedding is passed in, never held."""

    def __init__(self, target_config: GemmaConfig, vocab_ids: torch.Tensor | Sequence[int]):
        super().__init__()
        ids = torch.as_tensor(vocab_ids, dtype=torch.long).flatten()
        check_vocab(ids, target_config.vocab_size)
        self.target_config = target_config
        self.config = draft_config(target_config)
        d = target_config.d_model
        self.fc = nn.Linear(2 * d, d, bias=False)
        self.block = Block(self.config, 0)
        self.register_buffer("vocab_ids", ids.clone())
        self._inv_freq: dict = {}

    # RoPE exactly as the target's global layers compute it (same config fields, same code).
    inv_freq = GemmaModel.inv_freq
    rope = GemmaModel.rope

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None, std: float = 0.02) -> EagleHead:
        """Fresh weights that start as the identity h_{t+1} = h_t: ``fc`` passes the state through
        and the token embedding not at all, and the block's output projections (``o_proj``,
        ``down_proj``) are 0, so its residual branches add nothing yet (they get gradients at
        once, the rest of the block from the next step); the other linears from N(0, std^2), norm
        weights 0 (scale 1). Why: the embedded 270M's final-norm scales span 0.2-301 (median 9)
        over states of RMS ~4, so a small change of a normalised state is a large change of h.
        Measured on it (16 steps of 256 tokens, lr 1e-3): a head ending in a norm with the
        target's scales started at feature loss 17-21 (random or identity start) and its first
        optimizer step sent the token KL above 100; this head starts at 1.7 (KL 5.1), moves to
        2.3 after the first step and then falls (KL 2.6, top-1 0.07 -> 0.2 by step 16)."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.zero_()
            else:
                p.normal_(0.0, std, generator=generator)
        d = self.target_config.d_model
        self.fc.weight[:, :d] = 0.0  # the token's half of fc([e; h_t])
        self.fc.weight[:, d:] = torch.eye(d)  # h_t's half
        self.block.attn.o_proj.weight.zero_()
        self.block.mlp.down_proj.weight.zero_()
        return self

    @property
    def vocab_size(self) -> int:
        return self.vocab_ids.numel()

    def forward(self, features: torch.Tensor, token_embeds: torch.Tensor, input_pos: torch.Tensor | None = None,
                cache: KVCache | None = None, *, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted next hidden states [B, T, d] for pairs (``features`` [B, T, d]: the target's
        h_t, ``token_embeds`` [B, T, d]: the scaled embedding of x_{t+1}) at ``input_pos`` [B, T]
        (default 0..T-1; with ``segment_ids``, restarting per document as the target's positions
        do). With a ``cache`` the pairs' keys are written at ``input_pos`` and attention covers
        the cache; without, attention is causal (within documents)."""
        x = self.fc(torch.cat([token_embeds, features.to(token_embeds.dtype)], dim=-1))  # [B, T, d]
        B, T, _ = x.shape
        if input_pos is None:
            input_pos = (segment_positions(segment_ids) if segment_ids is not None
                         else torch.arange(T, device=x.device)[None].expand(B, T))
        rope = {False: self.rope(input_pos, False, x.dtype)}
        step = None
        if cache is not None:
            step = cache.step(input_pos, x.dtype)
            masks = {False: None}
        elif segment_ids is not None:
            masks = {False: attention_mask(input_pos, input_pos, None, x.dtype, q_seg=segment_ids, k_seg=segment_ids)}
        else:
            masks = {False: None}  # causal over 0..T-1
        return self.block(x, rope, masks, step)  # [B, T, d]: the residual stream is the prediction

    def logits(self, hidden: torch.Tensor, rows: torch.Tensor | nn.Module) -> torch.Tensor:
        """fp32 logits [..., N] over the reduced vocabulary: ``rows`` [N, d] are the target's
        embedding rows of ``vocab_ids`` (or a quantized linear over them); the target's final
        soft-cap applies as in its head."""
        logits = (F.linear(hidden, rows) if isinstance(rows, torch.Tensor) else rows(hidden)).float()
        cap = self.target_config.final_softcap
        return torch.tanh(logits / cap) * cap if cap is not None else logits


def check_vocab(ids: torch.Tensor, vocab_size: int, where: str = "the draft vocabulary") -> None:
    if ids.dim() != 1 or ids.numel() == 0:
        raise OpenGemmaError(f"{where} must be a non-empty list of token ids")
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise OpenGemmaError(f"{where} holds token ids outside the model's vocabulary of {vocab_size}")
    if torch.unique(ids).numel() != ids.numel():
        raise OpenGemmaError(f"{where} lists a token id twice")


def frequent_ids(counts: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` ids of highest count (``counts`` [V]), most frequent first, ties by lower id."""
    n = min(n, counts.numel())
    order = torch.argsort(-counts.to(torch.float64), stable=True)  # stable: equal counts keep id order
    return order[:n].clone()


def target_embeds(target, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The target's scaled input embedding of ``tokens`` (frozen, its own lookup: quantized
    embeddings dequantize the rows they read)."""
    return target.embed(tokens).to(dtype) * embed_scale(target.config.d_model, dtype)


# -- save / load -----------------------------------------------------------------------------------

def save_draft(path, head: EagleHead, *, info: dict | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write ``path/draft.safetensors`` (weights in ``dtype`` or their own, and ``vocab_ids``) and
    ``path/draft_config.json``."""
    from safetensors.torch import save_file

    from .atomic import atomic_write, atomic_write_bytes

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to("cpu", dtype) if dtype is not None and v.is_floating_point() else v.to("cpu")).contiguous()
               for k, v in head.state_dict().items()}
    atomic_write(path / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}))
    meta = {"format": FORMAT, "version": VERSION, "kind": "eagle", "vocab_size": head.vocab_size,
            "target_config": head.target_config.to_dict(), **(info or {})}
    atomic_write_bytes(path / CONFIG_FILE, (json.dumps(meta, indent=1) + "\n").encode())
    return path


def draft_dir(path) -> Path:
    """A ``--draft`` value as a head directory: the directory itself, or a training run's ``draft/``."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file() and (path / "draft" / CONFIG_FILE).is_file():
        return path / "draft"
    return path


def load_draft(path, target_config: GemmaConfig) -> tuple[EagleHead, dict]:
    """(head on the CPU in fp32, its draft_config.json) from a head directory (or a run directory
    holding ``draft/``); one clear error when it is missing, corrupt, or made for another model."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .checkpoints import read_json_object

    path = draft_dir(path)
    if not path.is_dir():
        raise OpenGemmaError(f"{path}: no such draft head directory")
    if not (path / CONFIG_FILE).is_file():
        raise OpenGemmaError(f"{path}: not a draft head (no {CONFIG_FILE}; `opengemma train draft` makes one)")
    meta = read_json_object(path / CONFIG_FILE)
    if meta.get("format") != FORMAT or meta.get("kind") != "eagle":
        raise OpenGemmaError(f"{path / CONFIG_FILE}: not an opengemma draft head")
    if meta.get("version") != VERSION:
        raise OpenGemmaError(f"{path / CONFIG_FILE}: draft head format version {meta.get('version')!r}, this "
                             f"opengemma reads version {VERSION}")
    saved = meta.get("target_config")
    if not isinstance(saved, dict):
        raise OpenGemmaError(f"{path / CONFIG_FILE}: no target_config")
    mine = target_config.to_dict()
    diffs = [f"{k} {saved.get(k)!r} vs {mine[k]!r}" for k in mine
             if k != "name" and _plain(saved.get(k)) != _plain(mine[k])]
    if diffs:
        raise OpenGemmaError(f"{path}: the draft head was trained for another model "
                             f"({saved.get('name', '?')}; differs in {', '.join(diffs[:4])})")
    try:
        tensors = load_file(path / WEIGHTS_FILE)
    except FileNotFoundError:
        raise OpenGemmaError(f"{path}: no {WEIGHTS_FILE}") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise OpenGemmaError(f"{path / WEIGHTS_FILE}: corrupt or unreadable ({_first_line(e)})") from None
    ids = tensors.get("vocab_ids")
    if ids is None or ids.dtype not in (torch.int64, torch.int32):
        raise OpenGemmaError(f"{path / WEIGHTS_FILE}: no integer vocab_ids tensor")
    check_vocab(ids.long(), target_config.vocab_size, f"{path / WEIGHTS_FILE}: vocab_ids")
    head = EagleHead(target_config, ids.long())
    own = head.state_dict()
    missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or extra:
        raise OpenGemmaError(f"{path / WEIGHTS_FILE}: tensors do not match a draft head "
                             f"(missing {missing[:3]}, unexpected {extra[:3]})")
    with torch.no_grad():
        for k, t in tensors.items():
            if k == "vocab_ids":
                continue
            if t.shape != own[k].shape or not t.is_floating_point():
                raise OpenGemmaError(f"{path / WEIGHTS_FILE}: {k} is {t.dtype} {list(t.shape)}, the head needs "
                                     f"floats of shape {list(own[k].shape)}")
            if not torch.isfinite(t).all():
                raise OpenGemmaError(f"{path / WEIGHTS_FILE}: {k} holds NaN or infinite values")
            own[k].copy_(t)
    return head.eval(), meta


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


# -- drafting ---------------------------------------------------------------------------------------

class EagleDrafter:
    """A :class:`opengemma.speculative.FeatureDrafter` over an :class:`EagleHead` and its target.

    Per sequence (:meth:`begin`): the head's KV cache of the target cache's length, and the
    target's hidden states not yet turned into cached pairs (:meth:`observe`). :meth:`propose`
    first writes those pairs (one forward over all of them), then drafts autoregressively and
    rolls its drafting pairs back. The head runs in the target's activation dtype and device;
    the reduced head's rows are gathered from the target's embedding once (N x d), and kept as
    int8 (per-row scales, the packed kernel of :mod:`opengemma.quant`) when ``int8_head`` (default:
    on the CPU, or when the target's own embedding is quantized): the reduced head is most of a
    draft step's time, and int8 rows make drafting k = 4 tokens for the embedded 270M in bf16
    ~27% cheaper than bf16 rows (one thread, busy machine). Drafts only guess, so this changes how
    often they are accepted, never the output.
    """

    def __init__(self, head: EagleHead, target, *, int8_head: bool | None = None):
        """``head`` is moved (in place) to ``target``'s device and activation dtype."""
        norm = target.final_norm.weight  # a float tensor even when the target is quantized
        self.dtype, self.device = norm.dtype, norm.device
        self.head = head.to(device=self.device, dtype=self.dtype).eval()
        self.target = target
        if int8_head is None:
            from .quant import QuantizedEmbedding

            int8_head = self.device.type == "cpu" or isinstance(target.embed, QuantizedEmbedding)
        self.int8_head = int8_head
        self.rows: torch.Tensor | nn.Module | None = None
        self.cache: KVCache | None = None
        self.pending: list[torch.Tensor] = []
        self.cached = 0
        self.q: torch.Tensor | None = None
        self.gen, self.generator = None, None
        self.vocab = target.config.vocab_size

    def begin(self, max_len: int, gen, generator: torch.Generator | None) -> None:
        """A new sequence, for a target cache of ``max_len`` positions, decoded with ``gen``."""
        with torch.inference_mode():
            if self.rows is None:
                rows = self.target.embed(self.head.vocab_ids.to(self.device)).to(self.dtype).contiguous()  # [N, d]
                if self.int8_head:
                    from .quant import Int8Linear

                    rows = Int8Linear.from_float(rows, act_dtype=self.dtype)
                self.rows = rows
            if self.cache is None or self.cache.max_len != max_len:
                self.cache = KVCache(self.head.config, 1, max_len, dtype=self.dtype, device=self.device)
            else:
                self.cache.reset()
        self.pending, self.cached, self.q = [], 0, None
        self.gen, self.generator = gen, generator

    def observe(self, hidden: torch.Tensor) -> None:
        """The target's final hidden states [n, d] of the next n positions of the sequence."""
        self.pending.append(hidden)

    def draft_probs(self) -> torch.Tensor | None:
        """q [n, V] of the latest proposal's drafts (None when greedy: the drafts are argmaxes)."""
        return self.q

    def propose(self, context_ids: Sequence[int], k: int) -> list[int]:
        if self.cache is None:
            raise RuntimeError("EagleDrafter.propose before begin()")
        self.q = None
        m = sum(h.shape[0] for h in self.pending)
        c = self.cached
        if len(context_ids) != c + m + 1:
            raise RuntimeError(f"draft head out of step: {c} pairs cached and {m} hidden states pending for a "
                               f"sequence of {len(context_ids)} tokens")
        k = min(k, self.cache.max_len - (c + m) + 1)  # drafting pairs sit at positions c+m .. c+m+k-2
        if k <= 0 or m == 0:
            return []
        greedy = self.gen is None or self.gen.temperature == 0
        dev, ids = self.device, self.head.vocab_ids
        with torch.inference_mode():
            feats = torch.cat(self.pending, dim=0)[None].to(self.dtype)  # [1, m, d]
            toks = torch.tensor([list(context_ids[c + 1:c + m + 1])], dtype=torch.long, device=dev)  # [1, m]
            pos = torch.arange(c, c + m, device=dev)[None]  # [1, m]
            h = self.head(feats, target_embeds(self.target, toks, self.dtype), pos, self.cache)[:, -1:]  # [1, 1, d]
            self.pending, self.cached = [], c + m
            drafts, qs = [], []
            one_tok = torch.zeros((1, 1), dtype=torch.long, device=dev)  # [1, 1]
            one_pos = torch.zeros((1, 1), dtype=torch.long, device=dev)  # [1, 1]
            for i in range(k):
                logits = self.head.logits(h[0], self.rows)  # [1, N] fp32
                if greedy:
                    j = logits.argmax(dim=-1)  # [1]
                else:
                    q = sampling_probs(logits, self.gen.temperature, self.gen.top_k, self.gen.top_p)  # [1, N]
                    j = draw(q, self.generator)  # [1]
                    qs.append(q)
                tok = ids[j]  # [1]
                drafts.append(tok)
                if i == k - 1:
                    break
                one_tok.copy_(tok[:, None])
                one_pos.fill_(c + m + i)
                h = self.head(h, target_embeds(self.target, one_tok, self.dtype), one_pos, self.cache)  # [1, 1, d]
            self.cache.forget(0, c + m, c + m + k - 1)  # the drafting pairs: built on guesses
            out = torch.cat(drafts).tolist()
            if qs:
                q = torch.cat(qs)  # [k, N]
                self.q = torch.zeros((len(qs), self.vocab), dtype=q.dtype, device=dev).index_copy_(
                    1, ids.to(dev), q)  # [k, V], 0 outside the reduced vocabulary
        return out


def load_drafter(path, target) -> EagleDrafter:
    """The drafter for ``--draft DIR``: the head at ``path`` checked against ``target``'s config."""
    head, _ = load_draft(path, target.config)
    return EagleDrafter(head, target)
