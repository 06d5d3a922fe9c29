"""Model configuration: one frozen dataclass for Gemma 1, 2 and 3 text models, plus presets.

Report section "Model Architecture" (Table 1) defines Gemma 1 2B and 7B; Gemma 2 and 3 differ only
by the flags below (soft-capping, sandwich norms, QK-norm, local/global layers, dual RoPE bases).
Presets are plain data in this file: no registry, no YAML.

Table 1 lists "Feedforward hidden dims" as 32768 (2B) and 49152 (7B): that is the sum of the two
GeGLU input branches (gate and up), so ``ffn_dim`` -- the width of each branch -- is half of it.
With that reading the presets reproduce Table 2's parameter counts exactly.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from .errors import OpenGemmaError

LOCAL = "local"  # sliding-window attention layer
GLOBAL = "global"  # full causal attention layer


@dataclass(frozen=True)
class GemmaConfig:
    name: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int  # 1 = multi-query (2B), n_heads = multi-head (7B), else grouped-query
    head_dim: int
    ffn_dim: int  # width of each GeGLU branch (gate and up)
    query_pre_attn_scalar: float  # queries are scaled by query_pre_attn_scalar ** -0.5
    context_length: int = 8192
    norm_eps: float = 1e-6
    rope_base: float = 10_000.0  # RoPE base of global layers
    rope_local_base: float | None = None  # RoPE base of local layers (None: same as rope_base)
    rope_scale: float = 1.0  # linear RoPE scaling factor, global layers only (Gemma 3 4B+)
    layer_types: tuple[str, ...] = ()  # LOCAL / GLOBAL per layer; () means every layer is global
    sliding_window: int | None = None  # tokens a local layer sees, itself included
    attn_softcap: float | None = None  # Gemma 2: tanh soft-cap of attention logits
    final_softcap: float | None = None  # Gemma 2: tanh soft-cap of output logits
    sandwich_norms: bool = False  # Gemma 2/3: post_attn_norm and post_mlp_norm
    qk_norm: bool = False  # Gemma 3: RMSNorm on queries and keys per head

    def __post_init__(self) -> None:
        problems = []
        for field in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim"):
            if not isinstance(getattr(self, field), int) or getattr(self, field) <= 0:
                problems.append(f"{field} must be a positive integer, got {getattr(self, field)!r}")
        if not problems and self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.layer_types and len(self.layer_types) != self.n_layers:
            problems.append(f"layer_types has {len(self.layer_types)} entries for {self.n_layers} layers")
        if any(t not in (LOCAL, GLOBAL) for t in self.layer_types):
            problems.append(f"layer_types entries must be {LOCAL!r} or {GLOBAL!r}")
        if LOCAL in self.layer_types and not (self.sliding_window and self.sliding_window > 0):
            problems.append("local layers need a positive sliding_window")
        if self.query_pre_attn_scalar <= 0 or self.context_length <= 0 or self.rope_scale <= 0:
            problems.append("query_pre_attn_scalar, context_length and rope_scale must be positive")
        if problems:
            raise OpenGemmaError(f"invalid model config {self.name!r}: " + "; ".join(problems))
        if isinstance(self.layer_types, list):  # JSON round trips give lists
            object.__setattr__(self, "layer_types", tuple(self.layer_types))

    # -- derived -----------------------------------------------------------------------------
    def is_local(self, layer: int) -> bool:
        return bool(self.layer_types) and self.layer_types[layer] == LOCAL

    @property
    def local_rope_base(self) -> float:
        return self.rope_base if self.rope_local_base is None else self.rope_local_base

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.d_model

    @property
    def non_embedding_params(self) -> int:
        """Parameters outside the (tied) embedding, as Table 2 counts them."""
        attn = self.d_model * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * self.d_model * self.ffn_dim
        norms = self.d_model * (4 if self.sandwich_norms else 2) + (2 * self.head_dim if self.qk_norm else 0)
        return self.n_layers * (attn + mlp + norms) + self.d_model

    def replace(self, **changes) -> "GemmaConfig":
        return dataclasses.replace(self, **changes)

    # -- plain data ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layer_types"] = list(self.layer_types)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GemmaConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise OpenGemmaError(f"unknown config field(s): {', '.join(unknown)}")
        try:
            return cls(**{**d, "layer_types": tuple(d.get("layer_types", ()))})
        except TypeError as e:
            raise OpenGemmaError(f"invalid model config: {e}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def layer_pattern(n_layers: int, locals_per_global: int) -> tuple[str, ...]:
    """Gemma 2 (1 local : 1 global) and Gemma 3 (5 local : 1 global) interleavings."""
    period = locals_per_global + 1
    return tuple(GLOBAL if (i + 1) % period == 0 else LOCAL for i in range(n_layers))


def _gemma1(name, d_model, n_layers, n_heads, n_kv_heads, ffn_dim, vocab=256_128, head_dim=256):
    return GemmaConfig(name=name, vocab_size=vocab, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                       n_kv_heads=n_kv_heads, head_dim=head_dim, ffn_dim=ffn_dim,
                       query_pre_attn_scalar=head_dim, context_length=8192)


def _gemma2(name, d_model, n_layers, n_heads, n_kv_heads, ffn_dim, qpas, vocab=256_000, head_dim=256,
            window=4096):
    return GemmaConfig(name=name, vocab_size=vocab, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                       n_kv_heads=n_kv_heads, head_dim=head_dim, ffn_dim=ffn_dim, query_pre_attn_scalar=qpas,
                       context_length=8192, layer_types=layer_pattern(n_layers, 1), sliding_window=window,
                       attn_softcap=50.0, final_softcap=30.0, sandwich_norms=True)


def _gemma3(name, d_model, n_layers, n_heads, n_kv_heads, ffn_dim, qpas, vocab=262_144, head_dim=256,
            window=1024, context=131_072, rope_scale=8.0):
    return GemmaConfig(name=name, vocab_size=vocab, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                       n_kv_heads=n_kv_heads, head_dim=head_dim, ffn_dim=ffn_dim, query_pre_attn_scalar=qpas,
                       context_length=context, rope_base=1_000_000.0, rope_local_base=10_000.0,
                       rope_scale=rope_scale, layer_types=layer_pattern(n_layers, 5), sliding_window=window,
                       sandwich_norms=True, qk_norm=True)


PRESETS: dict[str, GemmaConfig] = {
    # Gemma 1, Table 1 of the report.
    "gemma-2b": _gemma1("gemma-2b", 2048, 18, 8, 1, 16_384),
    "gemma-7b": _gemma1("gemma-7b", 3072, 28, 16, 16, 24_576),
    # Gemma 2.
    "gemma2-2b": _gemma2("gemma2-2b", 2304, 26, 8, 4, 9216, qpas=256),
    "gemma2-9b": _gemma2("gemma2-9b", 3584, 42, 16, 8, 14_336, qpas=256),
    "gemma2-27b": _gemma2("gemma2-27b", 4608, 46, 32, 16, 36_864, qpas=144, head_dim=128),
    # Gemma 3 text models (4B+ also have a vision tower, not part of the text model).
    "gemma3-270m": _gemma3("gemma3-270m", 640, 18, 4, 1, 2048, qpas=256, window=512, context=32_768,
                           rope_scale=1.0),
    "gemma3-1b": _gemma3("gemma3-1b", 1152, 26, 4, 1, 6912, qpas=256, window=512, context=32_768,
                         rope_scale=1.0),
    "gemma3-4b": _gemma3("gemma3-4b", 2560, 34, 8, 4, 10_240, qpas=256, vocab=262_208),
    "gemma3-12b": _gemma3("gemma3-12b", 3840, 48, 16, 8, 15_360, qpas=256, vocab=262_208),
    "gemma3-27b": _gemma3("gemma3-27b", 5376, 62, 32, 16, 21_504, qpas=168, head_dim=128, vocab=262_208),
    # A Gemma 3-shaped model of tens of millions of parameters for pretraining on a CPU (the
    # recorded run): 25M non-embedding parameters, ~29M with an 8k-piece tokenizer (the training
    # command resizes the vocabulary to the tokenizer's).
    "gemma3-30m": _gemma3("gemma3-30m", 512, 8, 4, 2, 1536, qpas=128, head_dim=128, window=512, context=32_768,
                          rope_scale=1.0),
    # Tiny configs for tests: every feature of each generation at toy size.
    "tiny-gemma1": _gemma1("tiny-gemma1", 64, 2, 4, 1, 128, vocab=512, head_dim=16),
    "tiny-gemma2": _gemma2("tiny-gemma2", 64, 4, 4, 2, 128, qpas=24, vocab=512, head_dim=16, window=8),
    "tiny-gemma3": GemmaConfig(
        name="tiny-gemma3", vocab_size=512, d_model=64, n_layers=6, n_heads=4, n_kv_heads=2, head_dim=16,
        ffn_dim=128, query_pre_attn_scalar=16, context_length=256, rope_base=1_000_000.0,
        rope_local_base=10_000.0, rope_scale=8.0, layer_types=layer_pattern(6, 2), sliding_window=8,
        sandwich_norms=True, qk_norm=True),
}


def preset(name: str) -> GemmaConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise OpenGemmaError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None
