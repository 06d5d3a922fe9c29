"""Policy optimisation against a reward with a KL penalty: RLOO, GRPO and J-BOND, on the one loop.

Report section "Instruction Tuning / RLHF": the policy is optimised against a reward model with
reinforcement learning, regularised toward the SFT policy. Each optimizer step, :class:`RLSource`
(the loop's batch source) rolls out completions from the live policy
(:func:`opengemma.train.rollout.rollout`), scores them through one reward interface
(:class:`Reward`: the reward model, GSM8K answer correctness, or any function), computes the
reference log-probs, and hands the loop micro-batches whose loss (:func:`rl_loss`) is one of:

* **RLOO** (Ahmadian et al. 2024): k samples per prompt; the KL to the reference is part of the
  reward (``R = r - beta * sum_t (log pi_old - log pi_ref)``) and each sample's baseline is the mean
  reward of the other k - 1: ``loss = -A * sum_t ratio_t`` (REINFORCE at ratio 1; the ratio to
  the sampler's log-probs keeps the gradient exact).
* **GRPO** (Shao et al. 2024): advantages normalised within the group, ``(r - mean) / (std +
  1e-4)``; per token the PPO-clipped surrogate (``clip``) minus ``beta`` times the k3 estimate of
  KL(pi || pi_ref); averaged over each completion's tokens.
* **J-BOND** (Sessa et al. 2024, the report family's method): distil Best-of-N sampling of a moving
  **anchor** into the policy with the Jeffreys divergence. Per prompt, ``anchor_samples`` (2)
  completions from the anchor and ``group_size`` from the policy. Forward KL: the negative
  log-likelihood of the anchor's best completion (weight 1 - ``jeffreys``). Backward KL: a policy
  gradient with the quantile reward ``log p_<=(y)``, ``p_<=`` estimated as the share of anchor
  samples whose reward is <= the policy sample's (floored at ``quantile_floor`` = 1/16, so a sample
  worse than every anchor sample costs log 16), centred on the batch mean (weight ``jeffreys``).
  Plus ``beta`` times KL(pi || anchor) (k3). The anchor is an exponential moving average of the
  policy's weights (rate ``anchor_ema``), so the policy distils Best-of-2 of an improving anchor:
  iterated BoN.
* **WARP** options (Ramé et al. 2024): ``anchor_ema > 0`` with RLOO/GRPO makes the KL reference
  the EMA anchor instead of the initial policy; ``liti < 1`` interpolates the final weights toward
  the initialisation (``theta_init + liti * (theta - theta_init)``) at the last step;
  :func:`slerp` merges the task vectors of several runs spherically.

References are weights, not models: :class:`WeightCopy` keeps a copy of the trainable parameters
(the adapters alone under LoRA, where the initial copy is the zero adapter, i.e. the base) and
swaps it into the live model for a no-grad forward (``Tensor.data`` swaps: no copies). The
reported ``kl`` is always to the initial (SFT) policy: sum over the completion of ``log pi_old -
log pi_init`` (k1), averaged over completions.

Single process: rollouts run on the one device that trains.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..chat import format_chat
from ..errors import OpenGemmaError
from .config import RL_ALGOS as ALGOS
from .data import RowStream
from .losses import LossOutput
from .prefs import Prompt
from .rollout import Rollout, SeqBatch, rollout, sequence_logprobs, to_batch


# -- rewards ---------------------------------------------------------------------------------------------
class Reward(Protocol):
    name: str

    def __call__(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[float]: ...


class GSM8KReward:
    """1.0 when the completion's answer equals the reference, else 0.0. The answer is extracted as
    the GSM8K evaluation does (:mod:`opengemma.eval.tasks.gsm8k`): the strict ``The answer is N``
    match, else the last number (flexible extract)."""

    name = "gsm8k"

    def __call__(self, prompts, completions):
        from ..eval.tasks import gsm8k

        out = []
        for p, text in zip(prompts, completions):
            if "answer" not in p.meta:
                raise OpenGemmaError("the gsm8k reward needs each prompt's reference 'answer' (GSM8K records)")
            got = gsm8k.extract_strict(text) or gsm8k.extract_flexible(text)
            out.append(1.0 if got is not None and got == gsm8k.gold(p.meta) else 0.0)
        return out


class RMReward:
    """A trained reward model's score of the conversation the completion ends (prompt messages plus
    the model turn), through the same chat formatter. The RM must share the policy's vocabulary."""

    def __init__(self, path, policy_config, policy_tokenizer, *, device=None, batch: int = 8):
        from . import reward

        self.rm, self.tokenizer = reward.load(path, device=device)
        self.name, self.batch = f"rm:{path}", batch
        if self.rm.config.vocab_size != policy_config.vocab_size:
            raise OpenGemmaError(f"the reward model {path} has a vocabulary of {self.rm.config.vocab_size}, the "
                                 f"policy {policy_config.vocab_size}: they must share one tokenizer")
        mine, theirs = _tok_digest(policy_tokenizer), _tok_digest(self.tokenizer)
        if mine and theirs and mine != theirs:
            raise OpenGemmaError(f"the reward model {path} uses another tokenizer than the policy")
        self.rm.requires_grad_(False)

    def __call__(self, prompts, completions):
        from .reward import score

        convs = [p.messages + [{"role": "model", "content": c}] for p, c in zip(prompts, completions)]
        return score(self.rm, self.tokenizer, convs, batch=self.batch)


def _tok_digest(tok) -> str | None:
    get = getattr(tok, "model_bytes", None)
    data = get() if callable(get) else None
    return hashlib.sha256(data).hexdigest() if data else None


class FnReward:
    """Any ``fn(prompt, completion) -> float`` as a :class:`Reward` (synthetic tasks, tests)."""

    def __init__(self, fn: Callable[[Prompt, str], float], name: str = "fn"):
        self.fn, self.name = fn, name

    def __call__(self, prompts, completions):
        return [float(self.fn(p, c)) for p, c in zip(prompts, completions)]


# -- weights as references -------------------------------------------------------------------------------
class WeightCopy:
    """A copy of named parameters (an initial policy, or an EMA anchor); ``Stateful`` for checkpoints."""

    def __init__(self, params: dict[str, torch.nn.Parameter]):
        self.params = params
        self.tensors = {n: p.detach().clone() for n, p in params.items()}

    @torch.no_grad()
    def ema_(self, rate: float) -> None:
        for n, p in self.params.items():
            self.tensors[n].lerp_(p.detach(), rate)

    @contextlib.contextmanager
    def swapped(self):
        """The live parameters hold this copy's values inside the block (pointer swaps, no copy)."""
        def swap():
            for n, p in self.params.items():
                p.data, self.tensors[n] = self.tensors[n], p.data

        swap()
        try:
            yield
        finally:
            swap()

    def state_dict(self) -> dict:
        return dict(self.tensors)

    def load_state_dict(self, d: dict) -> None:
        for n in self.tensors:
            self.tensors[n].copy_(d[n])


@torch.no_grad()
def interpolate_toward(params: dict[str, torch.nn.Parameter], init: WeightCopy, eta: float) -> None:
    """WARP's LITI: ``theta <- theta_init + eta * (theta - theta_init)``."""
    for n, p in params.items():
        p.copy_(torch.lerp(init.tensors[n], p.detach(), eta))


@torch.no_grad()
def slerp(init: dict[str, torch.Tensor], runs: Sequence[dict[str, torch.Tensor]], weights: Sequence[float] | None = None,
          ) -> dict[str, torch.Tensor]:
    """WARP's spherical merge of several RL runs' task vectors (``theta_i - theta_init``), per
    tensor: two runs by slerp at ``weights[1]``; more by successive slerps with running weights.
    Norms are interpolated linearly, directions on the sphere."""
    if len(runs) < 2:
        raise OpenGemmaError("slerp needs at least two runs")
    weights = list(weights) if weights is not None else [1.0 / len(runs)] * len(runs)
    out = {}
    for name, t0 in init.items():
        deltas = [r[name].float() - t0.float() for r in runs]
        merged, acc = deltas[0], weights[0]
        for d, w in zip(deltas[1:], weights[1:]):
            lam = w / (acc + w)
            na, nb = merged.norm(), d.norm()
            if na == 0 or nb == 0:
                merged = torch.lerp(merged, d, lam)
            else:
                cos = torch.clamp((merged * d).sum() / (na * nb), -1.0, 1.0)
                omega = torch.arccos(cos)
                if omega < 1e-6:
                    merged = torch.lerp(merged, d, lam)
                else:
                    dirn = (torch.sin((1 - lam) * omega) * merged / na + torch.sin(lam * omega) * d / nb) / torch.sin(omega)
                    merged = dirn * ((1 - lam) * na + lam * nb)
            acc += w
        out[name] = (t0.float() + merged).to(t0.dtype)
    return out


# -- configuration and batches ----------------------------------------------------------------------------
@dataclass(frozen=True)
class RLConfig:
    algo: str = "rloo"
    group_size: int = 4  # completions per prompt (J-BOND: policy samples per prompt)
    prompts_per_step: int = 4
    max_new_tokens: int = 64
    kl_coef: float = 0.05  # beta
    clip: float = 0.2  # GRPO's ratio clip
    jeffreys: float = 0.5  # J-BOND: weight of the backward KL; 1 - jeffreys on the forward KL
    anchor_ema: float = 0.0  # EMA rate of the anchor (J-BOND default 0.02; RLOO/GRPO: WARP's EMA reference)
    anchor_samples: int = 2  # J-BOND: anchor samples per prompt (Best-of-2)
    quantile_floor: float = 1.0 / 16
    liti: float = 1.0  # WARP: interpolation toward the init at the end (1 = none)
    micro_batch: int = 8  # sequences per micro-batch
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.algo not in ALGOS:
            problems.append(f"algo must be one of {', '.join(ALGOS)}, got {self.algo!r}")
        if self.algo in ("rloo", "grpo") and self.group_size < 2:
            problems.append(f"{self.algo} needs group_size >= 2 (a baseline from the other samples)")
        for name in ("group_size", "prompts_per_step", "max_new_tokens", "micro_batch", "anchor_samples"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        if not 0 <= self.jeffreys <= 1 or not 0 <= self.anchor_ema <= 1 or not 0 <= self.liti <= 1:
            problems.append("jeffreys, anchor_ema and liti must be in [0, 1]")
        if self.algo == "jbond" and self.anchor_ema <= 0:
            problems.append("jbond needs a moving anchor: anchor_ema > 0")
        if self.kl_coef < 0 or self.clip <= 0 or not 0 < self.quantile_floor <= 1:
            problems.append("kl_coef must be >= 0, clip > 0, quantile_floor in (0, 1]")
        if problems:
            raise OpenGemmaError("invalid RL config: " + "; ".join(problems))


@dataclass
class RLBatch:
    """One micro-batch of sequences with per-sequence coefficients:

    ``adv`` [B]: policy-gradient advantage; ``nll`` [B]: weight of ``-sum log pi`` (J-BOND's forward
    KL); ``kl_ref`` [B, T]: the KL reference's log-probs; ``kl_w`` [B]: weight of its KL term;
    ``scale`` [B]: each sequence's share of a counted unit; ``metrics``: precomputed sums to log."""

    seq: SeqBatch
    adv: torch.Tensor
    nll: torch.Tensor
    kl_ref: torch.Tensor
    kl_w: torch.Tensor
    scale: torch.Tensor
    on_policy: torch.Tensor  # [B] bool: sampled from the current policy (J-BOND's anchor samples are not)
    count: int
    metrics: dict = field(default_factory=dict)


def rl_loss(cfg: RLConfig):
    """The loss function of :func:`opengemma.train.loop.fit` for :class:`RLBatch` micro-batches."""

    def loss_fn(model, b: RLBatch) -> LossOutput:
        lp = sequence_logprobs(model, b.seq)  # [B, T], differentiable
        dev = lp.device
        mask = b.seq.mask.to(dev)
        m = mask.float()
        old, ref = b.seq.old_logprobs.to(dev), b.kl_ref.to(dev)
        adv, nll_w, kl_w, scale = b.adv.to(dev), b.nll.to(dev), b.kl_w.to(dev), b.scale.to(dev)
        mp = m * b.on_policy.to(dev)[:, None].float()  # [B, T]: completion tokens of on-policy samples
        # The ratio to the sampler: 1 off the policy's own completions (an anchor's old log-probs
        # are another policy's; their rows carry no advantage and must not overflow exp).
        ratio = torch.exp((lp - old) * mp)  # [B, T]
        # k3 estimator of KL(pi || ref) per token: exp(ref - lp) - (ref - lp) - 1 >= 0, unbiased.
        d = (ref - lp) * m
        k3 = (torch.exp(d) - d - 1) * m  # [B, T]
        lens = m.sum(1).clamp(min=1)  # [B]
        if cfg.algo == "grpo":
            a = adv[:, None]
            surr = torch.minimum(ratio * a, ratio.clamp(1 - cfg.clip, 1 + cfg.clip) * a)  # [B, T]
            per_seq = ((-surr + kl_w[:, None] * k3) * m).sum(1) / lens  # [B]
        else:
            per_seq = (-adv * (ratio * m).sum(1)  # policy gradient (REINFORCE at ratio 1)
                       - nll_w * (lp * m).sum(1)  # forward KL: likelihood of the anchor's best
                       + kl_w * k3.sum(1))  # [B]
        loss_sum = (per_seq * scale).sum()
        with torch.no_grad():
            gap = ((lp - old).abs() * mp).amax() if mp.any() else torch.zeros((), device=dev)
            metrics = dict(b.metrics)
            metrics["logprob_gap_mean"] = gap  # max |trainer - sampler| log p in this micro-batch
            metrics["clipped_sum"] = ((ratio - 1).abs() > cfg.clip).float().mul(mp).sum()
            metrics["clipped_count"] = mp.sum()
        return LossOutput(loss_sum=loss_sum, count=b.count, metrics=metrics)

    return loss_fn


def _split(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _sub(seq: SeqBatch, s: slice) -> SeqBatch:
    return SeqBatch(seq.tokens[s], seq.targets[s], seq.mask[s], seq.old_logprobs[s])


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """[P, G] rewards -> leave-one-out advantages: r_i - mean of the other G - 1."""
    G = rewards.shape[1]
    return rewards - (rewards.sum(1, keepdim=True) - rewards) / (G - 1)


def grpo_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """[P, G] rewards -> (r - group mean) / (group std + eps) (std with Bessel's correction, as TRL)."""
    return (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + eps)


def bond_quantile_reward(policy_r: torch.Tensor, anchor_r: torch.Tensor, floor: float) -> torch.Tensor:
    """J-BOND's backward-KL reward ``log p_<=(y)``: [P, G] policy rewards against [P, M] anchor
    rewards; ``p_<=`` = share of anchor samples with reward <= the policy sample's, floored."""
    share = (anchor_r[:, None, :] <= policy_r[:, :, None]).float().mean(-1)  # [P, G]
    return torch.log(share.clamp(min=floor))


class RLSource:
    """The loop's batch source for RL: rolls out, scores and prepares each step's micro-batches."""

    def __init__(self, model, tokenizer, prompts: Sequence[Prompt], reward: Reward, cfg: RLConfig, *,
                 params: dict[str, torch.nn.Parameter], max_steps: int):
        if not prompts:
            raise OpenGemmaError("no RL prompts")
        self.tok, self.prompts, self.reward, self.cfg = tokenizer, list(prompts), reward, cfg
        self.ids = [format_chat(tokenizer, p.messages, add_generation_prompt=True).ids for p in self.prompts]
        self.params, self.max_steps = params, max_steps
        self.init = WeightCopy(params)  # the reference (SFT) policy: the weights training starts from
        self.anchor = WeightCopy(params) if cfg.anchor_ema > 0 else None
        pad = getattr(tokenizer, "pad_id", 0)
        self.pad = pad if isinstance(pad, int) and pad >= 0 else 0
        self.order = RowStream(list(range(len(self.prompts))), cfg.seed, "RL prompts")

    # -- position ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return self.order.state_dict()

    def load_state_dict(self, d: dict) -> None:
        self.order.load_state_dict(d)

    def extra_state(self) -> dict:
        return {"rl_anchor": self.anchor} if self.anchor is not None else {}

    # -- one step ---------------------------------------------------------------------------------------
    def _roll(self, model, idx: list[int], n: int, seed: int) -> tuple[list[Rollout], torch.Tensor]:
        rolls = rollout(model, self.tok, [self.ids[i] for i in idx for _ in range(n)],
                        max_new_tokens=self.cfg.max_new_tokens, seed=seed)
        r = self.reward([self.prompts[i] for i in idx for _ in range(n)], [x.text for x in rolls])
        return rolls, torch.tensor(r, dtype=torch.float32).view(len(idx), n)  # [P, n]

    @torch.no_grad()
    def _ref_logprobs(self, model, seq: SeqBatch, copy: WeightCopy) -> torch.Tensor:
        was = model.training
        model.eval()
        try:
            with copy.swapped():
                out = [sequence_logprobs(model, _sub(seq, s)).cpu() for s in _split(seq.tokens.shape[0], self.cfg.micro_batch)]
        finally:
            model.train(was)
        T = seq.mask.shape[1]
        return torch.cat([torch.nn.functional.pad(o, (0, T - o.shape[1])) for o in out])  # [B, T]

    def next(self, model, step: int) -> list[RLBatch]:
        cfg = self.cfg
        idx = [next(self.order) for _ in range(cfg.prompts_per_step)]
        seed = cfg.seed * 1_000_003 + step
        P, G = len(idx), cfg.group_size
        n_pol = P * G  # policy samples come first; J-BOND appends the anchor's best per prompt
        metrics: dict = {}
        if cfg.algo == "jbond":
            with self.anchor.swapped():
                a_rolls, a_r = self._roll(model, idx, cfg.anchor_samples, seed + 500_009)
        rolls, r = self._roll(model, idx, G, seed)
        if cfg.algo == "jbond":
            best = [a_rolls[p * cfg.anchor_samples + int(a_r[p].argmax())] for p in range(P)]
            q = bond_quantile_reward(r, a_r, cfg.quantile_floor)  # [P, G]
            seq = to_batch(rolls + best, self.pad)
            adv = torch.cat([cfg.jeffreys * (q - q.mean()).reshape(-1), torch.zeros(P)])
            nll = torch.cat([torch.zeros(n_pol), torch.full((P,), 1 - cfg.jeffreys)])
            kl_w = torch.cat([torch.full((n_pol,), cfg.kl_coef), torch.zeros(P)])
            scale = torch.cat([torch.full((n_pol,), 1.0 / G), torch.ones(P)])  # one unit per prompt
            metrics.update({"bond_reward_sum": q.sum(), "bond_reward_count": q.numel(),
                            "anchor_reward_sum": a_r.sum(), "anchor_reward_count": a_r.numel()})
        else:
            seq = to_batch(rolls, self.pad)
        init_lp = self._ref_logprobs(model, seq, self.init)  # [B, T]
        kl_seq = ((seq.old_logprobs - init_lp) * seq.mask).sum(1)[:n_pol]  # [P * G]: k1 KL to the initial policy
        kl_ref = self._ref_logprobs(model, seq, self.anchor) if self.anchor is not None else init_lp
        if cfg.algo == "rloo":
            kl_to_ref = ((seq.old_logprobs - kl_ref) * seq.mask).sum(1).view(P, G)
            adv = rloo_advantages(r - cfg.kl_coef * kl_to_ref).reshape(-1)
            nll, kl_w, scale = torch.zeros(n_pol), torch.zeros(n_pol), torch.ones(n_pol)
        elif cfg.algo == "grpo":
            adv = grpo_advantages(r).reshape(-1)
            nll, kl_w, scale = torch.zeros(n_pol), torch.full((n_pol,), cfg.kl_coef), torch.ones(n_pol)
        on_policy = torch.arange(seq.tokens.shape[0]) < n_pol
        lens = seq.mask[:n_pol].sum(1).float()
        metrics.update({"reward_sum": r.sum(), "reward_count": r.numel(), "kl_sum": kl_seq.sum(), "kl_count": n_pol,
                        "completion_len_sum": lens.sum(), "completion_len_count": n_pol,
                        "stopped_sum": float(sum(x.finish_reason == "stop" for x in rolls)), "stopped_count": n_pol})
        batches = []
        for k, s in enumerate(_split(seq.tokens.shape[0], cfg.micro_batch)):
            # Counted units: sequences (RLOO, GRPO) or prompts (J-BOND, all on the first micro-batch).
            count = (P if k == 0 else 0) if cfg.algo == "jbond" else s.stop - s.start
            batches.append(RLBatch(_sub(seq, s), adv[s], nll[s], kl_ref[s], kl_w[s], scale[s], on_policy[s], count,
                                   metrics if k == 0 else {}))
        return batches

    # -- hooks for fit ----------------------------------------------------------------------------------
    def on_step(self, model, step: int, record: dict) -> None:
        """After each optimizer step: the EMA anchor follows the policy; at the last step WARP's
        interpolation toward the initialisation (``liti`` < 1)."""
        if self.anchor is not None:
            self.anchor.ema_(self.cfg.anchor_ema)
        if step == self.max_steps and self.cfg.liti < 1:
            interpolate_toward(self.params, self.init, self.cfg.liti)


def make_eval_fn(tokenizer, prompts: Sequence[Prompt], reward: Reward, max_new_tokens: int, batch: int = 16):
    """Greedy completions of held-out prompts: their mean reward, and the first as a sample."""
    ids = [format_chat(tokenizer, p.messages, add_generation_prompt=True).ids for p in prompts]

    def eval_fn(model, step):
        if not prompts:
            return {}
        rolls: list[Rollout] = []
        for i in range(0, len(ids), batch):
            rolls += rollout(model, tokenizer, ids[i:i + batch], max_new_tokens=max_new_tokens, seed=0, greedy=True)
        r = reward(list(prompts), [x.text for x in rolls])
        return {"eval/reward": sum(r) / len(r), "sample": rolls[0].text}

    return eval_fn


def is_heldout_prompt(p: Prompt, pct: float) -> bool:
    """Held-out RL prompts: BLAKE2b-64 of the prompt messages' text below ``pct`` percent of 2**64."""
    text = "\x1e".join(f"{m['role']}\x1f{m['content']}" for m in p.messages).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") < pct / 100 * 2**64

