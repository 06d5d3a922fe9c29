"""LoRA: low-rank adapters on a Gemma model's linear layers (Hu et al. 2021), for parameter-efficient
SFT, reward models and RL.

Report section "Instruction Tuning" fine-tunes the whole model; LoRA is the way a CPU or a single
GPU does the same within memory. A :class:`LoRALinear` wraps an ``nn.Linear`` ``W`` [out, in]
and adds ``scale * B @ A`` with ``A`` [r, in] (Kaiming-uniform, as PEFT) and ``B`` [out, r]
**zero-initialised**, so a fresh adapter leaves the model's outputs exactly unchanged, and
``scale = alpha / r``. Only ``A`` and ``B`` train; every other parameter is frozen.

* Targets are chosen by module name (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ``gate_proj``,
  ``up_proj``, ``down_proj``; :data:`DEFAULT_TARGETS` is all seven, as QLoRA recommends), or by a
  regular expression over the full dotted name.
* The tied embedding is never an adapter target: it is both the input embedding and the output
  head, and training's fused cross-entropy (:func:`opengemma.logprobs.token_nll_sum`) reads its one
  ``[vocab, d_model]`` weight directly, so an adapter on it would reach the inputs but not the
  head. It stays frozen and shared (PEFT's default too); an export holds it exactly once.
* :func:`merge` folds every adapter into its base weight (``W += scale * B @ A``: the merged model is
  a plain GemmaModel, as fast as the base) and :func:`unmerge` takes it out again.
* :func:`adapter_state_dict` is the adapter alone (a few MB); :func:`save_adapter` /
  :func:`load_adapter` write and read it as ``adapter.safetensors`` + ``adapter_config.json``,
  checked against the base model's shapes, so ``opengemma chat --adapter DIR`` puts an adapter on
  top of any compatible base at load time.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import OpenGemmaError

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FORMAT = "opengemma-lora"


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS  # module names (last dotted part), or "re:<regex>" on full names

    def __post_init__(self) -> None:
        if isinstance(self.targets, (list, str)):
            object.__setattr__(self, "targets", tuple([self.targets] if isinstance(self.targets, str) else self.targets))
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise OpenGemmaError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise OpenGemmaError(f"LoRA alpha must be a positive number, got {self.alpha!r}")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise OpenGemmaError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if not self.targets:
            raise OpenGemmaError("LoRA needs at least one target module name")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> LoRAConfig:
        try:
            return cls(rank=d["rank"], alpha=d["alpha"], dropout=d.get("dropout", 0.0), targets=tuple(d["targets"]))
        except (KeyError, TypeError) as e:
            raise OpenGemmaError(f"not a LoRA config ({e})") from None


class LoRALinear(nn.Module):
    """``base(x) + scale * B(A(dropout(x)))``; ``base`` frozen, ``A`` [r, in], ``B`` [out, r] = 0."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 generator: torch.Generator | None = None):
        super().__init__()
        if not isinstance(base, nn.Linear) or base.bias is not None:
            raise OpenGemmaError(f"LoRA wraps bias-free nn.Linear layers, got {type(base).__name__}")
        self.base = base
        self.rank, self.scale = rank, alpha / rank
        self.dropout = dropout
        w = base.weight
        self.base.weight.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=w.dtype, device=w.device))
        # PEFT's init of A: kaiming_uniform_(a=sqrt(5)), i.e. U(-1/sqrt(in), 1/sqrt(in)); drawn from an
        # explicit generator so that applying LoRA never touches the global RNG.
        bound = 1.0 / math.sqrt(base.in_features)
        with torch.no_grad():
            self.lora_A.copy_(torch.rand(self.lora_A.shape, generator=generator, dtype=torch.float32) * 2 * bound - bound)
        self.merged = False
        self.enabled = True

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:  # the base's (merged or not): code that reads .weight sees a Linear
        return self.base.weight

    def delta(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scale  # [out, in]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)  # [..., out]
        if self.merged or not self.enabled:
            return out
        h = F.dropout(x, self.dropout, self.training) if self.dropout else x
        return out + F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scale  # [..., r] -> [..., out]

    # Out of place (a new tensor in .data): a base weight may be a copy-on-write memory map of the
    # weight cache, and the Parameter object (which an optimizer may hold) stays the same.
    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            w = self.base.weight
            w.data = w.data + self.delta().to(w.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            w = self.base.weight
            w.data = w.data - self.delta().to(w.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}, merged={self.merged}"


def _matches(name: str, targets: Iterable[str]) -> bool:
    last = name.rsplit(".", 1)[-1]
    for t in targets:
        if t.startswith("re:"):
            if re.fullmatch(t[3:], name):
                return True
        elif t == last:
            return True
    return False


def apply_lora(model: nn.Module, config: LoRAConfig, *, seed: int = 0) -> list[str]:
    """Wrap every target linear of ``model`` in a :class:`LoRALinear` (in place) and freeze every
    other parameter; returns the wrapped modules' names. A target naming the tied embedding, or
    matching nothing, is an error."""
    if any(t in ("embed", "lm_head") or (t.startswith("re:") and re.fullmatch(t[3:], "embed")) for t in config.targets):
        raise OpenGemmaError("the tied embedding cannot be a LoRA target: it is both the input embedding and the "
                             "output head (read directly by the fused loss); it stays frozen and shared")
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and _matches(n, config.targets)]
    if not names:
        raise OpenGemmaError(f"no linear layer matches the LoRA targets {', '.join(config.targets)} "
                             f"(known: {', '.join(DEFAULT_TARGETS)})")
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, LoRALinear(getattr(parent, attr), config.rank, config.alpha, config.dropout, g))
    model.lora_config = config
    return names


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """(name, module) of every adapter, named as in the unwrapped model (activation checkpointing's
    wrappers do not change adapter files or merged state dicts)."""
    from .parallel import plain_name

    return [(plain_name(n), m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for _, m in lora_modules(model) for p in (m.lora_A, m.lora_B)]


def merge(model: nn.Module) -> None:
    for _, m in lora_modules(model):
        m.merge()


def unmerge(model: nn.Module) -> None:
    for _, m in lora_modules(model):
        m.unmerge()


@contextlib.contextmanager
def disabled(model: nn.Module):
    """The base model's outputs: every (unmerged) adapter switched off inside the block."""
    mods = [m for _, m in lora_modules(model)]
    if any(m.merged for m in mods):
        raise OpenGemmaError("adapters are merged: unmerge them before disabling")
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m in mods:
            m.enabled = True


@torch.no_grad()
def hold_frozen_base(model: nn.Module, dtype: torch.dtype) -> int:
    """Store the frozen weight matrices (every frozen linear layer and the tied embedding) in
    ``dtype``; returns how many weight tensors it covers. Norm weights and adapters stay as they are.

    For LoRA under bf16 autocast: autocast casts an fp32 weight to bf16 on every matmul, and a frozen
    weight is not in its cache, so each decode step of an RL rollout would re-read and re-write the
    whole base (1.6 GB a token for the 270M, most of it the 262k-row head). Held in bf16, the
    matmuls see the very values autocast would have made, and the base takes half the memory. The
    one change in numerics is the input embedding, looked up from bf16-rounded rows (as a bf16
    model's is); the residual stream stays in the norms' dtype. Everything that runs the model
    must then run under autocast (``fit`` runs its source, loss and evaluation so)."""
    seen: set[int] = set()
    for m in model.modules():
        w = getattr(m, "weight", None)
        if not isinstance(w, nn.Parameter) or w.requires_grad or id(w) in seen or not w.is_floating_point():
            continue
        if isinstance(m, (nn.Linear, nn.Embedding)):
            seen.add(id(w))
            if w.dtype != dtype:
                w.data = w.data.to(dtype)
    return len(seen)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapters: ``{module name}.lora_A`` / ``.lora_B`` -> tensor."""
    return {f"{n}.{k}": getattr(m, k).detach() for n, m in lora_modules(model) for k in ("lora_A", "lora_B")}


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain GemmaModel state dict with every adapter folded in (the model is left as it was):
    the names of an unwrapped model, one embedding tensor."""
    out = {}
    wrapped = dict(lora_modules(model))
    for name, t in model.state_dict().items():
        mod, _, leaf = name.rpartition(".")
        if leaf in ("lora_A", "lora_B"):
            continue
        if mod.endswith(".base") and mod[:-5] in wrapped:
            m = wrapped[mod[:-5]]
            t = t if m.merged else t + m.delta().detach().to(t.dtype)
            name = f"{mod[:-5]}.{leaf}"
        out[name] = t.detach()
    return out


def unwrap(model: nn.Module) -> nn.Module:
    """Merge and replace every LoRALinear by its base nn.Linear (in place): a plain model."""
    for name, m in lora_modules(model):
        m.merge()
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, m.base)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


# -- files ------------------------------------------------------------------------------------------
def save_adapter(dst, model: nn.Module, *, base: str | None = None, dtype: torch.dtype | None = None) -> Path:
    """``dst/adapter.safetensors`` (adapters only, in ``dtype`` if given: bf16 halves an fp32
    adapter and loads back into fp32 for the merge) and ``dst/adapter_config.json`` (rank, alpha,
    targets, the base model's config for the compatibility check, and where the base came from)."""
    from safetensors.torch import save_file

    from ..atomic import atomic_write, atomic_write_bytes

    cfg = getattr(model, "lora_config", None)
    if cfg is None:
        raise OpenGemmaError("the model has no LoRA adapters to save")
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to("cpu", dtype or v.dtype).contiguous() for k, v in adapter_state_dict(model).items()}
    atomic_write(dst / ADAPTER_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}))
    info = {"format": FORMAT, "lora": cfg.to_dict(), "base_config": model.config.to_dict(), "base": base}
    atomic_write_bytes(dst / ADAPTER_CONFIG, (json.dumps(info, indent=1) + "\n").encode())
    return dst


DEFAULT_ADAPTER = "default"
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "adapters"


def adapter_dir(name) -> Path:
    """An ``--adapter`` value as a directory: ``default`` (unless a directory of that name exists
    here) is the chat adapter shipped inside the package for the embedded model
    (``opengemma/adapters/default``, when a version ships one)."""
    path = Path(name)
    if str(name) == DEFAULT_ADAPTER and not path.exists():
        return SHIPPED_DIR / DEFAULT_ADAPTER
    return path


def read_adapter(path) -> tuple[LoRAConfig, dict, dict[str, torch.Tensor]]:
    """(LoRA config, adapter_config.json, tensors) of an adapter directory (or ``default``, the
    shipped one); one clear error if not one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..checkpoints import read_json_object

    path = adapter_dir(path)
    if path == SHIPPED_DIR / DEFAULT_ADAPTER and not (path / ADAPTER_CONFIG).is_file():
        raise OpenGemmaError("no default adapter ships with this version of opengemma: give an adapter "
                             "directory (`opengemma train adapter RUN DIR`)")
    if not (path / ADAPTER_CONFIG).is_file():
        raise OpenGemmaError(f"{path}: not a LoRA adapter directory (no {ADAPTER_CONFIG})")
    info = read_json_object(path / ADAPTER_CONFIG)
    if info.get("format") != FORMAT:
        raise OpenGemmaError(f"{path / ADAPTER_CONFIG}: not an opengemma LoRA adapter")
    cfg = LoRAConfig.from_dict(info.get("lora") or {})
    try:
        tensors = load_file(path / ADAPTER_WEIGHTS)
    except (SafetensorError, OSError) as e:
        raise OpenGemmaError(f"{path / ADAPTER_WEIGHTS}: corrupt or unreadable ({e})") from None
    return cfg, info, tensors


def load_adapter(model: nn.Module, path, *, merge_weights: bool = True) -> nn.Module:
    """Put the adapter at ``path`` on ``model`` (a plain GemmaModel, float weights) in place; merged
    into the weights by default (no cost at inference). The adapter must fit the model: same layer
    shapes, and a base of the same architecture."""
    cfg, info, tensors = read_adapter(path)
    base_cfg = info.get("base_config") or {}
    mine = model.config.to_dict()
    diffs = [k for k in ("d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "vocab_size")
             if k in base_cfg and base_cfg[k] != mine.get(k)]
    if diffs:
        raise OpenGemmaError(f"{path}: the adapter was trained on another model ({', '.join(f'{k} {base_cfg[k]} vs {mine[k]}' for k in diffs)})")
    if not all(isinstance(p, nn.Parameter) and p.is_floating_point() for p in model.parameters()):
        raise OpenGemmaError("an adapter needs float weights (load the base without --quantize)")
    apply_lora(model, cfg)
    own = adapter_state_dict(model)
    missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or extra:
        raise OpenGemmaError(f"{path}: adapter tensors do not match the model (missing {missing[:3]}, unexpected {extra[:3]})")
    with torch.no_grad():
        for n, m in lora_modules(model):
            for k in ("lora_A", "lora_B"):
                t = tensors[f"{n}.{k}"]
                if t.shape != getattr(m, k).shape:
                    raise OpenGemmaError(f"{path}: {n}.{k} has shape {list(t.shape)}, the model needs "
                                         f"{list(getattr(m, k).shape)}")
                if not torch.isfinite(t).all():
                    raise OpenGemmaError(f"{path}: {n}.{k} holds NaN or infinite values")
                getattr(m, k).copy_(t)
    if merge_weights:
        unwrap(model)
    return model


def load_with_adapter(model, adapter, *, dtype=None, device=None, quantize=None, compile: bool = False,
                      kernels: str = "auto"):
    """``opengemma.load`` of ``model`` with the LoRA adapter at ``adapter`` merged in (the commands'
    ``--adapter PATH``): loaded in float32, merged, then cast to ``dtype``, quantized and compiled
    as asked (quantizing after merging keeps the adapter's small deltas exact until then)."""
    from .. import compiled as compiled_mod
    from .. import quant
    from ..api import auto_mode, parse_dtype, resolve, use_kernels
    from ..process import load_for_command

    g = load_for_command(model, dtype="float32", device=device)
    load_adapter(g.model, adapter)
    if quantize == "auto":  # as the base alone would run; a quantized file's weights now merged in fp32
        quantize, auto_dtype = auto_mode(resolve(model), g.device)
        dtype = dtype if dtype is not None else auto_dtype
    g.model.to(parse_dtype(dtype, g.device))
    if quantize not in (None, "none"):
        quant.check_mode(quantize)
        quant.quantize_model(g.model, quantize)
    use_kernels(g.model, kernels)
    if compile:
        compiled_mod.enable(g.model)
    g.name = f"{g.name}+{'adapter-default' if adapter_dir(adapter).parent == SHIPPED_DIR else Path(adapter).name}"
    return g


def export_run(run_dir, run: dict, checkpoint, dst, *, hf: bool = False, dtype=torch.float32) -> Path:
    """``opengemma train export`` of a LoRA run: the base with the adapter merged in, as a plain model
    directory (one embedding tensor), in opengemma's native layout or (``hf``) Hugging Face's."""
    from ..checkpoints import hf as hf_ckpt
    from ..checkpoints import native

    model = rebuild(run_dir, run, checkpoint)
    state = {k: v.to(dtype) for k, v in merged_state_dict(model).items()}
    tok = Path(run_dir) / run.get("tokenizer", "tokenizer.model")
    (hf_ckpt.save if hf else native.save)(dst, model.config, state,
                                          tokenizer_model_bytes=tok.read_bytes() if tok.is_file() else None)
    return Path(dst)


def fingerprint(model: nn.Module) -> float:
    """A float64 checksum of a model's weights (position-weighted sums of every tensor): a run records
    its base's, so that an export that reloads the base notices another one."""
    total = 0.0
    for i, (_, p) in enumerate(sorted(model.state_dict().items())):
        if p.is_floating_point():
            total += (i + 1) * float(torch.sum(p.detach(), dtype=torch.float64))
    return total


def load_base(model: nn.Module, run_dir, run: dict, checkpoint) -> None:
    """Fill ``model`` (not yet adapted) with the run's frozen base, for a checkpoint that holds only
    the trainable weights: the checkpoint or preset named in run.json, checked by its fingerprint."""
    from .pretrain import build
    from .state import Checkpointer

    origin = run.get("model") or {}
    spec = origin.get("path") or origin.get("preset")
    if not spec:
        raise OpenGemmaError(f"{run_dir}: run.json does not name the base model the adapters were trained on")
    seed = Checkpointer(Path(checkpoint).parent).read_meta(Path(checkpoint)).get("train", {}).get("seed", 0)
    tok = None
    if "preset" in origin and (Path(run_dir) / run.get("tokenizer", "tokenizer.model")).is_file():
        from ..tokenizer import Tokenizer

        tok = Tokenizer.from_file(Path(run_dir) / run.get("tokenizer", "tokenizer.model"))
    try:
        base, _, _ = build(spec, tok, seed, torch.device("cpu"))
    except OpenGemmaError as e:
        raise OpenGemmaError(f"{run_dir}: its checkpoints hold only the trained weights, and the base model "
                             f"could not be loaded ({e})") from None
    if base.config.to_dict() != model.config.to_dict():
        raise OpenGemmaError(f"{run_dir}: the base model {spec} is not the one this run was trained on (config differs)")
    want = run.get("base_fingerprint")
    if want is not None and abs(fingerprint(base) - want) > 1e-7 * max(1.0, abs(want)):
        raise OpenGemmaError(f"{run_dir}: the base model {spec} has changed since this run was trained "
                             "(its weights' fingerprint differs)")
    model.load_state_dict(base.state_dict())


def rebuild(run_dir, run: dict, checkpoint) -> nn.Module:
    """The run's model with its LoRA adapters, weights from ``checkpoint`` (one process, CPU)."""
    from ..config import GemmaConfig
    from ..model import GemmaModel
    from .state import holds_all_weights, load_model_weights

    if "lora" not in run:
        raise OpenGemmaError(f"{run_dir}: run.json has no LoRA settings")
    model = GemmaModel(GemmaConfig.from_dict(run["model_config"]))
    if not holds_all_weights(Path(checkpoint)):
        load_base(model, run_dir, run, checkpoint)
    apply_lora(model, LoRAConfig.from_dict(run["lora"]))
    load_model_weights(Path(checkpoint), model)
    return model.eval()
