"""Hugging Face checkpoints: config.json + safetensors directories of Gemma 1, 2 and 3 text models.

Part of the checkpoint layer. Reads what ``transformers`` writes for ``GemmaForCausalLM``
(model_type "gemma"), ``Gemma2ForCausalLM`` ("gemma2"), ``Gemma3ForCausalLM`` ("gemma3_text")
and the text half of ``Gemma3ForConditionalGeneration`` ("gemma3", config under ``text_config``,
weights under ``language_model.model.`` or ``model.language_model.``); writes the first three,
with the tokenizer files transformers needs to load them as it loads Google's own checkpoints
(:func:`tokenizer_files`: BOS added, a chat template equal to opengemma's formatter, both stop ids).

Keys a config.json omits take the defaults of transformers 5.23's config classes -- real files
rely on that (gemma-3-4b's ``text_config`` names only 6 keys). Both the transformers 5
``rope_parameters`` layout and the older ``rope_theta`` / ``rope_scaling`` /
``rope_local_base_freq`` / ``sliding_window_pattern`` keys are understood. HF stores RMSNorm
weights in the reference (1 + w) convention already, so tensors need no numeric fix; only the
name map, Gemma 1's naming of its pre-MLP norm ``post_attention_layernorm``, and the tied
``lm_head`` (dropped, after checking it equals the embedding).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..config import GLOBAL, LOCAL, GemmaConfig
from ..errors import OpenGemmaError
from . import (as_dtype, atomic_write, atomic_write_bytes, check_state_dict, checked_cast, read_json_object,
               require_path)

MODEL_TYPES = ("gemma", "gemma2", "gemma3_text", "gemma3")
_REQUIRED = ("hidden_size", "num_hidden_layers", "intermediate_size")
# transformers 5.23 class defaults (models/gemma*/configuration_gemma*.py) for the keys we read.
_DEFAULTS = {
    "gemma": dict(vocab_size=256_000, num_attention_heads=16, num_key_value_heads=16, head_dim=256,
                  max_position_embeddings=8192, rms_norm_eps=1e-6, rope_theta=10_000.0,
                  hidden_act="gelu_pytorch_tanh"),
    "gemma2": dict(vocab_size=256_000, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                   max_position_embeddings=8192, rms_norm_eps=1e-6, rope_theta=10_000.0,
                   query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0,
                   final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh"),
    "gemma3_text": dict(vocab_size=262_208, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                        max_position_embeddings=131_072, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
                        rope_local_base_freq=10_000.0, query_pre_attn_scalar=256, sliding_window=4096,
                        attn_logit_softcapping=None, final_logit_softcapping=None, sliding_window_pattern=6,
                        hidden_activation="gelu_pytorch_tanh"),
}
# GELU with the tanh approximation, which all Gemma generations use. Gemma 1's released configs
# say "gelu"; transformers' GemmaConfig rewrites that to the tanh form, and so do we. For Gemma
# 2/3, "gelu" would make transformers run the exact erf GELU, which we do not implement.
_TANH_GELU = ("gelu_pytorch_tanh", "gelu_new")
_ARCHITECTURES = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
_LAYER_TYPES = {"sliding_attention": LOCAL, "full_attention": GLOBAL}

_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")
_COMMON = {  # HF name inside model.layers.N. -> ours inside layers.N.
    "input_layernorm.weight": "pre_attn_norm.weight",
    "self_attn.q_proj.weight": "attn.q_proj.weight", "self_attn.k_proj.weight": "attn.k_proj.weight",
    "self_attn.v_proj.weight": "attn.v_proj.weight", "self_attn.o_proj.weight": "attn.o_proj.weight",
    "self_attn.q_norm.weight": "attn.q_norm.weight", "self_attn.k_norm.weight": "attn.k_norm.weight",
    "pre_feedforward_layernorm.weight": "pre_mlp_norm.weight",
    "post_feedforward_layernorm.weight": "post_mlp_norm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight", "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}
# Multimodal Gemma 3 prefixes (transformers < 4.52, then >= 4.52) -> the text-only layout.
_MULTIMODAL_PREFIXES = {"language_model.model.": "model.", "model.language_model.": "model.",
                        "language_model.lm_head.": "lm_head."}


# -- names ----------------------------------------------------------------------------------------
def _layer_map(gemma1: bool) -> dict[str, str]:
    # Gemma 1 has no sandwich norms: its ``post_attention_layernorm`` is the norm before the MLP.
    return {**_COMMON, "post_attention_layernorm.weight": "pre_mlp_norm.weight" if gemma1 else "post_attn_norm.weight"}


def from_hf_name(name: str, gemma1: bool) -> str | None:
    """Our name for an HF text-model tensor name; None for names with no counterpart."""
    if name == "model.embed_tokens.weight":
        return "embed.weight"
    if name == "model.norm.weight":
        return "final_norm.weight"
    if m := _LAYER_RE.fullmatch(name):
        rest = _layer_map(gemma1).get(m.group(2))
        return None if rest is None else f"layers.{int(m.group(1))}.{rest}"
    return None


def to_hf_name(name: str, gemma1: bool) -> str:
    """The HF text-model name of one of our tensor names."""
    if name == "embed.weight":
        return "model.embed_tokens.weight"
    if name == "final_norm.weight":
        return "model.norm.weight"
    layer, rest = name[len("layers."):].split(".", 1)
    inverse = {ours: theirs for theirs, ours in _layer_map(gemma1).items()}
    if gemma1:
        inverse["pre_mlp_norm.weight"] = "post_attention_layernorm.weight"
    return f"model.layers.{layer}.{inverse[rest]}"


# -- config ---------------------------------------------------------------------------------------



def _text_config(raw: dict, where) -> tuple[str, dict]:
    model_type = raw.get("model_type")
    if model_type is None:
        raise OpenGemmaError(f"{where}: config.json has no model_type")
    if model_type not in MODEL_TYPES:
        raise OpenGemmaError(f"{where}: unsupported architecture {model_type!r} "
                             f"(supported model_type: {', '.join(MODEL_TYPES)})")
    if model_type == "gemma3":  # multimodal: the text model's config is nested
        text = raw.get("text_config") or {}
        if not isinstance(text, dict):
            raise OpenGemmaError(f"{where}: text_config must be a JSON object")
        return "gemma3_text", text
    return model_type, raw


def _rope(cfg: dict, model_type: str, where) -> tuple[float, float | None, float]:
    """(global base, local base or None, global linear scale) from either config layout."""
    full = {"rope_theta": cfg["rope_theta"]}
    local = {"rope_theta": cfg["rope_local_base_freq"]} if model_type == "gemma3_text" else None
    params = cfg.get("rope_parameters") or {}
    if local is not None and ("full_attention" in params or "sliding_attention" in params):
        full.update(params.get("full_attention") or {})
        local.update(params.get("sliding_attention") or {})
    else:
        full.update(params)
    full.update(cfg.get("rope_scaling") or {})  # older configs: applies to global layers only

    def scale(p: dict, kind: str) -> float:
        rope_type = p.get("rope_type", p.get("type", "default"))
        if rope_type == "default":
            return 1.0
        if rope_type == "linear":
            return float(p.get("factor", 1.0))
        raise OpenGemmaError(f"{where}: unsupported RoPE type {rope_type!r} on {kind} layers (only linear)")

    if local is not None and scale(local, "local") != 1.0:
        raise OpenGemmaError(f"{where}: RoPE scaling of local layers is not supported")
    return float(full["rope_theta"]), None if local is None else float(local["rope_theta"]), scale(full, "global")


def config_from_hf(raw: dict, name: str = "hf-model", where="config.json") -> GemmaConfig:
    """Our config for a parsed HF config.json (any supported model_type)."""
    model_type, text = _text_config(raw, where)
    if missing := [k for k in _REQUIRED if k not in text]:
        raise OpenGemmaError(f"{where}: config.json lacks required key(s) {', '.join(missing)}")
    cfg = {**_DEFAULTS[model_type], **{k: v for k, v in text.items() if v is not None or k.endswith("softcapping")}}
    if text.get("sliding_window_pattern") is None and text.get("_sliding_window_pattern") is not None:
        cfg["sliding_window_pattern"] = text["_sliding_window_pattern"]
    if cfg.get("use_bidirectional_attention"):
        raise OpenGemmaError(f"{where}: bidirectional (embedding) Gemma models are not supported")
    if cfg.get("attention_bias"):
        raise OpenGemmaError(f"{where}: attention biases are not supported")
    act = cfg["hidden_act"] if model_type == "gemma" else cfg["hidden_activation"]
    if act not in _TANH_GELU and not (model_type == "gemma" and act == "gelu"):
        raise OpenGemmaError(f"{where}: unsupported activation {act!r} (Gemma uses gelu_pytorch_tanh)")

    try:
        return _build_config(cfg, model_type, name, where)
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise OpenGemmaError(f"{where}: bad value in config.json ({e})") from None


def _build_config(cfg: dict, model_type: str, name: str, where) -> GemmaConfig:
    n_layers, n_heads = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_heads
    layer_types: tuple[str, ...] = ()
    if model_type != "gemma":
        if cfg.get("layer_types"):
            unknown = sorted(set(map(str, cfg["layer_types"])) - set(_LAYER_TYPES))
            if unknown:
                raise OpenGemmaError(f"{where}: unsupported layer type(s) {', '.join(unknown)}")
            layer_types = tuple(_LAYER_TYPES[t] for t in cfg["layer_types"])
        else:
            # Gemma 2 alternates starting with a local layer (``is_sliding = not bool(i % 2)``);
            # Gemma 3 puts a global layer after every ``sliding_window_pattern - 1`` local ones.
            period = 2 if model_type == "gemma2" else int(cfg["sliding_window_pattern"])
            layer_types = tuple(GLOBAL if (i + 1) % period == 0 else LOCAL for i in range(n_layers))
    window = cfg.get("sliding_window") if LOCAL in layer_types else None
    rope_base, rope_local, rope_scale = _rope(cfg, model_type, where)
    if model_type == "gemma2" and rope_scale != 1.0 and LOCAL in layer_types:
        raise OpenGemmaError(f"{where}: RoPE scaling of a Gemma 2 model's local layers is not supported")
    return GemmaConfig(
        name=name, vocab_size=cfg["vocab_size"], d_model=cfg["hidden_size"], n_layers=n_layers,
        n_heads=n_heads, n_kv_heads=cfg.get("num_key_value_heads") or n_heads, head_dim=head_dim,
        ffn_dim=cfg["intermediate_size"],
        # Gemma 1 scales queries by head_dim ** -0.5; 2 and 3 made the scalar a config entry.
        query_pre_attn_scalar=float(head_dim if model_type == "gemma" else cfg["query_pre_attn_scalar"]),
        context_length=cfg["max_position_embeddings"], norm_eps=float(cfg["rms_norm_eps"]),
        rope_base=rope_base, rope_local_base=rope_local, rope_scale=rope_scale,
        layer_types=layer_types, sliding_window=window,
        attn_softcap=cfg.get("attn_logit_softcapping") or None,
        final_softcap=cfg.get("final_logit_softcapping") or None,
        sandwich_norms=model_type != "gemma", qk_norm=model_type == "gemma3_text")


def read_config(path) -> GemmaConfig:
    """The config of an HF checkpoint directory, from its config.json."""
    path = require_path(path)
    if not path.is_dir():
        raise OpenGemmaError(f"{path}: expected a directory with config.json and *.safetensors")
    return config_from_hf(read_json_object(path / "config.json"), name=path.resolve().name, where=path)


def _hf_model_type(config: GemmaConfig) -> str:
    if config.qk_norm and config.sandwich_norms:
        return "gemma3_text"
    if config.sandwich_norms and not config.qk_norm:
        return "gemma2"
    if not config.sandwich_norms and not config.qk_norm:
        return "gemma"
    raise OpenGemmaError(f"config {config.name!r}: QK-norm without sandwich norms has no HF Gemma equivalent")


def config_to_hf(config: GemmaConfig, dtype: torch.dtype = torch.float32) -> dict:
    """A config.json dict that transformers loads as the matching Gemma model class."""
    model_type = _hf_model_type(config)
    where = f"cannot express config {config.name!r} as HF {model_type}"
    qpas = config.query_pre_attn_scalar
    if qpas != int(qpas) or (model_type == "gemma" and qpas != config.head_dim):
        raise OpenGemmaError(f"{where}: query_pre_attn_scalar {qpas} (HF needs an integer, head_dim for Gemma 1)")
    if model_type == "gemma" and (config.attn_softcap or config.final_softcap or LOCAL in config.layer_types):
        raise OpenGemmaError(f"{where}: soft-capping and local layers need Gemma 2 or 3")
    if model_type != "gemma3_text" and config.local_rope_base != config.rope_base:
        raise OpenGemmaError(f"{where}: separate local RoPE base needs Gemma 3")
    if model_type == "gemma2" and config.rope_scale != 1.0 and LOCAL in config.layer_types:
        raise OpenGemmaError(f"{where}: HF Gemma 2 would scale RoPE of local layers too")
    scaling = {"rope_type": "linear", "factor": config.rope_scale} if config.rope_scale != 1.0 else None
    full = {"rope_type": "default", **(scaling or {}), "rope_theta": config.rope_base}
    out = {
        "architectures": [_ARCHITECTURES[model_type]], "model_type": model_type,
        "vocab_size": config.vocab_size, "hidden_size": config.d_model,
        "intermediate_size": config.ffn_dim, "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads, "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim, "max_position_embeddings": config.context_length,
        "rms_norm_eps": config.norm_eps, "tie_word_embeddings": True, "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
        "dtype": str(dtype).removeprefix("torch."),
        # Legacy keys too, for transformers 4.x and llama.cpp's convert_hf_to_gguf.py.
        "rope_theta": config.rope_base, "rope_scaling": scaling,
    }
    if model_type == "gemma":
        out.update(hidden_act="gelu_pytorch_tanh", rope_parameters=full)
        return out
    layer_types = config.layer_types or (GLOBAL,) * config.n_layers
    out.update(
        hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=int(qpas),
        sliding_window=config.sliding_window,
        layer_types=["sliding_attention" if t == LOCAL else "full_attention" for t in layer_types],
        attn_logit_softcapping=config.attn_softcap, final_logit_softcapping=config.final_softcap)
    if model_type == "gemma2":
        out["rope_parameters"] = full
    else:
        out["rope_local_base_freq"] = config.local_rope_base
        out["rope_parameters"] = {"full_attention": full, "sliding_attention": {
            "rope_type": "default", "rope_theta": config.local_rope_base}}
    return out


# -- tensors --------------------------------------------------------------------------------------
def _weight_files(path: Path) -> list[Path]:
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise OpenGemmaError(f"{index}: no weight_map")
        files = [path / f for f in dict.fromkeys(weight_map.values())]
        if missing := [f.name for f in files if not f.is_file()]:
            raise OpenGemmaError(f"{path}: missing shard(s) {', '.join(missing)}")
        return files
    raise OpenGemmaError(f"{path}: no model.safetensors or model.safetensors.index.json "
                         "(only safetensors checkpoints are supported)")


def load(path, dtype: torch.dtype = torch.float32) -> tuple[GemmaConfig, dict[str, torch.Tensor]]:
    """Config and state dict (our names) of an HF Gemma checkpoint directory; every tensor is checked
    to be finite and plausible (:func:`~opengemma.checkpoints.check_finite`)."""
    config = read_config(path)
    path, dtype = Path(path), as_dtype(dtype)
    multimodal = read_json_object(path / "config.json").get("model_type") == "gemma3"
    gemma1 = not config.sandwich_norms
    state: dict[str, torch.Tensor] = {}
    lm_head = None
    for file in _weight_files(path):
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    name = key
                    if multimodal:
                        prefix = next((p for p in _MULTIMODAL_PREFIXES if key.startswith(p)), None)
                        if prefix is None:
                            continue  # vision tower and projector: not part of the text model
                        name = _MULTIMODAL_PREFIXES[prefix] + key[len(prefix):]
                    if name == "lm_head.weight":
                        lm_head = f.get_tensor(key).to(dtype)  # compared with the checked embedding
                        continue
                    if name.endswith("rotary_emb.inv_freq"):  # a cached buffer in old checkpoints
                        continue
                    ours = from_hf_name(name, gemma1)
                    if ours is None:
                        raise OpenGemmaError(f"{file}: unexpected tensor {key!r} for a Gemma model")
                    state[ours] = checked_cast(key, f.get_tensor(key), dtype, file)
        except (SafetensorError, OSError) as e:
            raise OpenGemmaError(f"{file}: corrupt or unreadable safetensors file ({e})") from None
    # Gemma ties the output projection to the embedding; a stored copy must be exactly that.
    if lm_head is not None and not ("embed.weight" in state and torch.equal(lm_head, state["embed.weight"])):
        raise OpenGemmaError(f"{path}: lm_head.weight differs from the embedding; untied output "
                             "embeddings are not supported")
    check_state_dict(config, state, path)
    return config, state


# -- tokenizer files ------------------------------------------------------------------------------
# Jinja of opengemma.chat.format_chat, for tokenizer.apply_chat_template: <bos> once; each turn
# "<start_of_turn>{user|model}\n{content | trim}<end_of_turn>\n"; a leading system message is
# folded into the first user turn as system + "\n\n" (not trimmed); "assistant" means "model";
# format_chat's errors are raise_exception() calls. It is Gemma 3's own template (text part) plus
# format_chat's stricter checks, so a valid conversation renders to the same ids either way.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}"
    "{%- if not loop_messages -%}"
    "{{ raise_exception('a system message must be followed by a user message') }}{%- endif -%}"
    "{%- else -%}{%- set system = none -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- if not loop_messages -%}"
    "{{ raise_exception('messages is empty: a conversation needs at least one user message') }}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['content'] is not string -%}"
    "{{ raise_exception('message content must be a string') }}{%- endif -%}"
    "{%- set role = 'model' if message['role'] in ['model', 'assistant'] else message['role'] -%}"
    "{%- if role != ('user' if loop.index0 % 2 == 0 else 'model') -%}"
    "{{ raise_exception('roles must alternate user/model, starting with user; only the first message "
    "may be a system message') }}{%- endif -%}"
    "{%- set body = message['content'] | trim -%}"
    "{%- if loop.first and system is not none -%}{%- set body = system + '\\n\\n' + body -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\\n' + body + '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{%- if loop_messages[-1]['role'] in ['model', 'assistant'] -%}"
    "{{ raise_exception('add_generation_prompt needs the conversation to end with a user message') }}"
    "{%- endif -%}"
    "{{ '<start_of_turn>model\\n' }}"
    "{%- endif -%}"
)


def tokenizer_files(tokenizer, config: GemmaConfig) -> dict[str, dict]:
    """tokenizer_config.json, special_tokens_map.json and generation_config.json for ``tokenizer``
    (an :class:`opengemma.tokenizer.Tokenizer`), as Google's Gemma checkpoints ship them: without
    them transformers adds no ``<bos>`` (Gemma's outputs degrade badly without it), knows no chat
    template, and stops generation at ``<eos>`` only, never at ``<end_of_turn>``."""
    piece = tokenizer.id_to_piece
    specials = {"bos_token": piece(tokenizer.bos_id), "eos_token": piece(tokenizer.eos_id),
                "unk_token": piece(tokenizer.unk_id)}
    if tokenizer.pad_id >= 0:
        specials["pad_token"] = piece(tokenizer.pad_id)
    turns = [p for p in ("<start_of_turn>", "<end_of_turn>") if _has_piece(tokenizer, p)]
    if turns:
        specials["additional_special_tokens"] = turns
    tok_config = {
        "tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False,
        **specials, "model_max_length": config.context_length, "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False, "sp_model_kwargs": {}, "use_default_system_prompt": False,
    }
    if len(turns) == 2:  # the chat format needs both turn markers
        tok_config["chat_template"] = CHAT_TEMPLATE
    gen_config = {"bos_token_id": tokenizer.bos_id, "eos_token_id": list(tokenizer.stop_ids)}
    if tokenizer.pad_id >= 0:
        gen_config["pad_token_id"] = tokenizer.pad_id
    return {"tokenizer_config.json": tok_config, "special_tokens_map.json": specials,
            "generation_config.json": gen_config}


def save(path, config: GemmaConfig, state_dict: dict[str, torch.Tensor],
         tokenizer_model_bytes: bytes | None = None) -> None:
    """Write an HF checkpoint directory that ``transformers`` loads as it loads Google's own:
    config.json and model.safetensors for ``AutoModelForCausalLM.from_pretrained``; with a
    tokenizer, tokenizer.model plus tokenizer_config.json (BOS added, the chat template of
    :func:`opengemma.chat.format_chat`), special_tokens_map.json and generation_config.json
    (stop at ``<eos>`` and ``<end_of_turn>``) for ``AutoTokenizer`` and ``generate``. Each file
    is written atomically; config.json goes last, so a directory with a config.json is complete."""
    check_state_dict(config, state_dict, "state dict to save")
    dtypes = {t.dtype for t in state_dict.values()}
    hf_config = config_to_hf(config, dtypes.pop() if len(dtypes) == 1 else torch.float32)
    gemma1 = hf_config["model_type"] == "gemma"
    tensors = {to_hf_name(k, gemma1): v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write(path / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    if tokenizer_model_bytes is not None:
        from ..tokenizer import Tokenizer

        atomic_write_bytes(path / "tokenizer.model", tokenizer_model_bytes)
        tokenizer = Tokenizer.from_file(path / "tokenizer.model")  # the ids exactly as written
        for name, data in tokenizer_files(tokenizer, config).items():
            atomic_write_bytes(path / name, _json_bytes(data))
        hf_config.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                         pad_token_id=tokenizer.pad_id if tokenizer.pad_id >= 0 else None)
    atomic_write_bytes(path / "config.json", _json_bytes(hf_config))


def _has_piece(tokenizer, piece: str) -> bool:
    try:
        tokenizer.piece_to_id(piece)
    except OpenGemmaError:
        return False
    return True


def _json_bytes(data: dict) -> bytes:
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode()
