"""Tests for opengemma.checkpoints: GGUF (every quant type we meet), HF and native formats, errors.

Small GGUF files are written with gguf-py's GGUFWriter. gguf-py quantizes F16, BF16, Q8_0 and
Q5_0 itself; Q4_K and Q6_K blocks come from the small hand quantizers below, written from ggml's
block layouts (``block_q4_K`` / ``block_q6_K``), so those types are checked against known
originals too. The embedded Gemma 3 270M Q4_K_M file is compared tensor by tensor with
transformers' own GGUF loading; HF checkpoints round-trip through transformers' model classes.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from functools import partial

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize
from safetensors.torch import load_file, save_file

from opengemma import checkpoints
from opengemma.checkpoints import gguf as ckpt_gguf
from opengemma.checkpoints import hf as ckpt_hf
from opengemma.checkpoints import native as ckpt_native
from opengemma.config import GLOBAL, LOCAL, PRESETS, GemmaConfig, layer_pattern
from opengemma.errors import OpenGemmaError

transformers = pytest.importorskip("transformers")

# Written out independently of the module under test, from llama.cpp's tensor names.
OURS_TO_GGUF = {
    "pre_attn_norm": "attn_norm", "attn.q_proj": "attn_q", "attn.k_proj": "attn_k", "attn.v_proj": "attn_v",
    "attn.o_proj": "attn_output", "attn.q_norm": "attn_q_norm", "attn.k_norm": "attn_k_norm",
    "post_attn_norm": "post_attention_norm", "pre_mlp_norm": "ffn_norm", "post_mlp_norm": "post_ffw_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}

# A Gemma 3 shaped config whose rows are whole 256-value K-quant super-blocks.
QCONFIG = GemmaConfig(
    name="quant-test", vocab_size=256, d_model=256, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=128,
    ffn_dim=512, query_pre_attn_scalar=128, context_length=1024, rope_base=1_000_000.0,
    rope_local_base=10_000.0, layer_types=(LOCAL, GLOBAL), sliding_window=16, sandwich_norms=True, qk_norm=True)


def gguf_name(ours: str) -> str:
    if ours == "embed.weight":
        return "token_embd.weight"
    if ours == "final_norm.weight":
        return "output_norm.weight"
    _, layer, rest = ours.split(".", 2)
    return f"blk.{layer}.{OURS_TO_GGUF[rest.removesuffix('.weight')]}.weight"


def random_state(config: GemmaConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in checkpoints.expected_shapes(config).items():
        if name.endswith("norm.weight"):
            # Multiples of 1/1024 near zero: (w + 1) - 1 == w exactly in float32, so the GGUF
            # +1 / -1 round trip can be checked bit for bit.
            state[name] = torch.randint(-256, 256, shape, generator=g).float() / 1024
        else:
            state[name] = torch.randn(shape, generator=g) * 0.05
    return state


def one_line(excinfo, *needles):
    msg = str(excinfo.value)
    assert "\n" not in msg and msg, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


# -- hand quantizers for the K-quants gguf-py cannot produce --------------------------------------
def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """ggml block_q6_K: ql[128] low nibbles, qh[64] high 2 bits, int8 scales[16], fp16 d."""
    b = x.reshape(-1, 16, 16).astype(np.float32)  # super-blocks of 16 sub-blocks of 16
    nb = b.shape[0]
    sub = np.abs(b).max(-1) / 31
    d = (sub.max(-1) / 127).astype(np.float16)
    d32 = d.astype(np.float32)
    sc = np.ceil(sub / np.where(d32 > 0, d32, 1)[:, None]).clip(0, 127).astype(np.int8)
    eff = d32[:, None] * sc
    q = (np.round(b / np.where(eff > 0, eff, 1)[..., None]).clip(-32, 31) + 32).astype(np.uint8)
    q = q.reshape(nb, 256)
    ql, qh = np.zeros((nb, 128), np.uint8), np.zeros((nb, 64), np.uint8)
    for h in range(2):  # each half: y[32k + l] for k < 4, l < 32
        v = q[:, 128 * h:128 * (h + 1)].reshape(nb, 4, 32)
        ql[:, 64 * h:64 * h + 32] = (v[:, 0] & 0xF) | ((v[:, 2] & 0xF) << 4)
        ql[:, 64 * h + 32:64 * h + 64] = (v[:, 1] & 0xF) | ((v[:, 3] & 0xF) << 4)
        qh[:, 32 * h:32 * h + 32] = (v[:, 0] >> 4) | ((v[:, 1] >> 4) << 2) | ((v[:, 2] >> 4) << 4) | ((v[:, 3] >> 4) << 6)
    blocks = np.concatenate([ql, qh, sc.view(np.uint8), d.view(np.uint8).reshape(nb, 2)], axis=1)
    return blocks.reshape(x.shape[0], -1)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """ggml block_q4_K: fp16 d, fp16 dmin, 12 bytes of packed 6-bit scales/mins, qs[128] nibbles."""
    b = x.reshape(-1, 8, 32).astype(np.float32)  # super-blocks of 8 sub-blocks of 32
    nb = b.shape[0]
    lo = np.minimum(b.min(-1), 0)
    sub_scale, sub_min = (b.max(-1) - lo) / 15, -lo
    d = (sub_scale.max(-1) / 63).astype(np.float16)
    dmin = (sub_min.max(-1) / 63).astype(np.float16)
    d32, dmin32 = d.astype(np.float32), dmin.astype(np.float32)
    sc = np.ceil(sub_scale / np.where(d32 > 0, d32, 1)[:, None]).clip(0, 63).astype(np.uint8)
    mn = np.round(sub_min / np.where(dmin32 > 0, dmin32, 1)[:, None]).clip(0, 63).astype(np.uint8)
    eff_scale, eff_min = d32[:, None] * sc, dmin32[:, None] * mn
    q = np.round((b + eff_min[..., None]) / np.where(eff_scale > 0, eff_scale, 1)[..., None]).clip(0, 15)
    q = q.astype(np.uint8).reshape(nb, 4, 2, 32)  # chunk of 64 = sub-blocks 2c (low) and 2c+1 (high)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(nb, 128)
    scales = np.zeros((nb, 12), np.uint8)
    for j in range(4):
        scales[:, j] = sc[:, j] | ((sc[:, j + 4] >> 4) << 6)
        scales[:, j + 4] = mn[:, j] | ((mn[:, j + 4] >> 4) << 6)
        scales[:, j + 8] = (sc[:, j + 4] & 0xF) | ((mn[:, j + 4] & 0xF) << 4)
    blocks = np.concatenate([d.view(np.uint8).reshape(nb, 2), dmin.view(np.uint8).reshape(nb, 2), scales, qs], axis=1)
    return blocks.reshape(x.shape[0], -1)


QUANTIZERS = {Q.Q4_K: quantize_q4_k, Q.Q6_K: quantize_q6_k}
# Max |dequantized - original| as a fraction of the tensor's max |value|: about half a
# quantization step of each format (F16/BF16: half an ulp of the largest value). Q5_0 gets a
# whole step: its scale is max / -16, so the opposite extreme clips from q = 16 to 15.
TOLERANCE = {Q.F32: 0.0, Q.F16: 2 ** -11, Q.BF16: 2 ** -8, Q.Q8_0: 1 / 127, Q.Q5_0: 1 / 16,
             Q.Q4_K: 0.08, Q.Q6_K: 1 / 40}


def write_gguf(path, config: GemmaConfig, state: dict, qtype=Q.F32, arch: str | None = None,
               extra_kv: dict | None = None, extra_tensors: dict | None = None, overrides: dict | None = None):
    """A GGUF file as llama.cpp's converter writes one: +1 on norms (kept F32), other tensors as qtype."""
    arch = arch or ("gemma3" if config.qk_norm else "gemma2" if config.sandwich_norms else "gemma")
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(config.name)
    w.add_context_length(config.context_length)
    w.add_embedding_length(config.d_model)
    w.add_block_count(config.n_layers)
    w.add_feed_forward_length(config.ffn_dim)
    w.add_head_count(config.n_heads)
    w.add_head_count_kv(config.n_kv_heads)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_layer_norm_rms_eps(config.norm_eps)
    w.add_rope_freq_base(config.rope_base)
    if LOCAL in config.layer_types:
        w.add_sliding_window(config.sliding_window)
        period = next(n for n in range(1, config.n_layers + 1)
                      if layer_pattern(config.n_layers, n - 1) == config.layer_types)
        if period != (6 if arch == "gemma3" else 2):
            w.add_sliding_window_pattern(period)
    if config.attn_softcap:
        w.add_attn_logit_softcapping(config.attn_softcap)
    if config.final_softcap:
        w.add_final_logit_softcapping(config.final_softcap)
    if config.rope_scale != 1.0:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(config.rope_scale)
    for key, value in (extra_kv or {}).items():
        (w.add_string if isinstance(value, str) else w.add_array if isinstance(value, list) else
         w.add_float32 if isinstance(value, float) else w.add_uint32)(key, value)
    quantize = QUANTIZERS.get(qtype, partial(gguf_quantize, qtype=qtype))
    for ours, tensor in state.items():
        values = tensor.float().numpy()
        if ours.endswith("norm.weight"):
            w.add_tensor(gguf_name(ours), values + np.float32(1))  # 1-D tensors stay F32
        elif (overrides or {}).get(ours) is not None:
            w.add_tensor(gguf_name(ours), *overrides[ours])
        elif qtype == Q.F32:
            w.add_tensor(gguf_name(ours), values)
        elif qtype == Q.F16:
            w.add_tensor(gguf_name(ours), values.astype(np.float16))
        else:
            w.add_tensor(gguf_name(ours), quantize(values), raw_dtype=qtype)
    for name, values in (extra_tensors or {}).items():
        w.add_tensor(name, values)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# -- GGUF: synthetic files ------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["tiny-gemma1", "tiny-gemma2", "tiny-gemma3"])
def test_gguf_tiny_presets_round_trip(tmp_path, preset):
    config = PRESETS[preset]
    state = random_state(config)
    path = write_gguf(tmp_path / "m.gguf", config, state)
    expected = config
    if preset == "tiny-gemma2":
        # GGUF has no query_pre_attn_scalar key; llama.cpp uses head_dim below the 27B.
        expected = config.replace(query_pre_attn_scalar=config.head_dim)
    assert ckpt_gguf.read_config(path) == expected
    got_config, got = ckpt_gguf.load(path)
    assert got_config == expected
    assert set(got) == set(state) == set(checkpoints.expected_shapes(config))
    for name, tensor in state.items():
        assert torch.equal(got[name], tensor), name  # F32 and exact norms: bit-identical
    # The file really holds 1 + w for norms (llama.cpp's convention) and we undid it.
    raw = {t.name: t for t in gguf.GGUFReader(path).tensors}
    norm = np.asarray(raw["output_norm.weight"].data)
    assert np.array_equal(norm, state["final_norm.weight"].numpy() + 1)


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q5_0, Q.Q4_K, Q.Q6_K], ids=lambda q: q.name)
def test_gguf_quant_types(tmp_path, qtype):
    state = random_state(QCONFIG, seed=1)
    path = write_gguf(tmp_path / "m.gguf", QCONFIG, state, qtype)
    config, got = ckpt_gguf.load(path)
    assert config == QCONFIG
    types = ckpt_gguf.tensor_types(path)
    assert types["blk.1.ffn_down.weight"] == types["token_embd.weight"] == qtype.name
    assert types["blk.1.attn_q_norm.weight"] == "F32"
    worst = 0.0
    for t in gguf.GGUFReader(path).tensors:  # gguf-py's reader and dequantizer as the reference
        ours = next(n for n in state if gguf_name(n) == t.name)
        ref = gguf_dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        if ours.endswith("norm.weight"):
            ref = ref - np.float32(1)
        assert torch.equal(got[ours], torch.from_numpy(np.array(ref))), ours
        if not ours.endswith("norm.weight"):
            rel = float((got[ours] - state[ours]).abs().max() / state[ours].abs().max())
            assert rel <= TOLERANCE[qtype], (ours, rel)
            worst = max(worst, rel)
    assert (worst == 0.0) == (qtype == Q.F32)  # the lossy types really were quantized


def test_gguf_header_matches_gguf_reader(tmp_path):
    extra = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["<pad>", "<eos>", "▁hé", ""],
             "tokenizer.ggml.scores": [0.0, -1.5, 2.25, 3.0], "general.tags": ["a", "b"]}
    path = write_gguf(tmp_path / "m.gguf", PRESETS["tiny-gemma3"], random_state(PRESETS["tiny-gemma3"]),
                      Q.Q8_0, extra_kv=extra)
    header = ckpt_gguf.read_header(path, strings=True)
    reader = gguf.GGUFReader(path)
    assert set(header.metadata) == {k for k in reader.fields if not k.startswith("GGUF.")}
    for key, value in header.metadata.items():
        theirs = reader.fields[key].contents()
        if isinstance(value, np.ndarray):
            assert value.tolist() == pytest.approx(theirs), key
        else:
            assert value == pytest.approx(theirs) if isinstance(value, float) else value == theirs, key
    assert [(t.name, t.shape, t.qtype, t.offset, t.n_bytes) for t in header.tensors] == [
        (t.name, tuple(reversed(t.shape.tolist())), t.tensor_type, t.data_offset, t.n_bytes) for t in reader.tensors]
    assert ckpt_gguf.read_header(path).metadata["tokenizer.ggml.tokens"] == 4  # skipped, length kept


def test_gguf_llama_cpp_conventions(tmp_path):
    """Metadata-only files: llama.cpp's defaults for keys the converter leaves out."""
    def meta_file(arch, n_layers, d_model, n_heads, head_dim, **kv):
        w = gguf.GGUFWriter(str(tmp_path / f"{arch}-{n_layers}.gguf"), arch)
        for key, value in {"context_length": 8192, "embedding_length": d_model, "block_count": n_layers,
                           "feed_forward_length": 4 * d_model, "attention.head_count": n_heads,
                           "attention.head_count_kv": n_heads // 2, "attention.key_length": head_dim}.items():
            w.add_uint32(f"{arch}.{key}", value)
        w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
        for key, value in kv.items():
            (w.add_float32 if isinstance(value, float) else w.add_uint32)(f"{arch}.{key}", value)
        w.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))  # vocab 8; d_model not checked here
        w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
        return ckpt_gguf.read_config(w.path)

    g2 = meta_file("gemma2", 46, 4608, 32, 128)  # Gemma 2 27B without soft-cap/window keys
    assert g2.query_pre_attn_scalar == 4608 / 32 == PRESETS["gemma2-27b"].query_pre_attn_scalar
    assert (g2.attn_softcap, g2.final_softcap, g2.sliding_window) == (50.0, 30.0, 4096)
    assert g2.layer_types == layer_pattern(46, 1) and g2.layer_types[0] == LOCAL
    assert meta_file("gemma2", 26, 2304, 8, 256).query_pre_attn_scalar == 256
    g3 = meta_file("gemma3", 62, 5376, 32, 128, **{"attention.sliding_window": 1024})
    assert g3.query_pre_attn_scalar == 168 == PRESETS["gemma3-27b"].query_pre_attn_scalar
    assert g3.layer_types == layer_pattern(62, 5) and g3.rope_local_base == 10_000.0
    no_swa = meta_file("gemma3", 26, 1152, 4, 256)  # no sliding_window key: all layers global
    assert not any(map(no_swa.is_local, range(26))) and no_swa.sliding_window is None
    g1 = meta_file("gemma", 28, 3072, 16, 256)
    assert (g1.query_pre_attn_scalar, g1.layer_types, g1.sandwich_norms, g1.qk_norm) == (256, (), False, False)


def test_gguf_output_weight(tmp_path):
    config = PRESETS["tiny-gemma3"]
    state = random_state(config)
    embed = state["embed.weight"].numpy()
    tied = write_gguf(tmp_path / "tied.gguf", config, state, extra_tensors={"output.weight": embed})
    assert set(ckpt_gguf.load(tied)[1]) == set(state)  # an identical copy is dropped
    untied = write_gguf(tmp_path / "untied.gguf", config, state, extra_tensors={"output.weight": embed * 2})
    with pytest.raises(OpenGemmaError) as e:
        ckpt_gguf.load(untied)
    one_line(e, "untied")


# -- GGUF: the real embedded file ------------------------------------------------------------------
def test_real_gguf_config(gguf_path):
    config = ckpt_gguf.read_config(gguf_path)
    assert config.name == "Gemma 3 270m"
    assert config.replace(name=PRESETS["gemma3-270m"].name) == PRESETS["gemma3-270m"]
    header = ckpt_gguf.read_header(gguf_path, strings=True)
    tokens = header.metadata["tokenizer.ggml.tokens"]
    assert len(tokens) == config.vocab_size and tokens[:3] == ["<pad>", "<eos>", "<bos>"]
    assert ckpt_gguf.tensor_types(gguf_path)["token_embd.weight"] == "Q8_0"


@pytest.mark.slow
def test_real_gguf_matches_transformers(gguf_path, hf_gguf_state_dict):
    hf_config, theirs = hf_gguf_state_dict
    start = time.perf_counter()
    config, ours = ckpt_gguf.load(gguf_path)
    print(f"\nopengemma GGUF load: {time.perf_counter() - start:.2f} s")
    assert set(ckpt_gguf.tensor_types(gguf_path).values()) == {"F32", "Q5_0", "Q4_K", "Q8_0", "Q6_K"}
    mapped = {ckpt_hf.from_hf_name(k, gemma1=False): v for k, v in theirs.items()}
    assert set(mapped) == set(ours)
    different = [k for k in ours if not torch.equal(ours[k], mapped[k])]
    assert not different  # every tensor bit-identical, norms included
    assert ckpt_hf.config_from_hf(hf_config.to_dict(), name=config.name) == config.replace(norm_eps=hf_config.rms_norm_eps)


# -- Hugging Face ---------------------------------------------------------------------------------
def hf_twin(preset: str):
    """transformers (model class, config) equivalent to one of our tiny presets."""
    c = PRESETS[preset]
    base = dict(vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.ffn_dim,
                num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
                head_dim=c.head_dim, max_position_embeddings=c.context_length)
    if preset == "tiny-gemma1":
        return transformers.GemmaForCausalLM, transformers.GemmaConfig(**base)
    types = ["sliding_attention" if t == LOCAL else "full_attention" for t in c.layer_types]
    if preset == "tiny-gemma2":
        return transformers.Gemma2ForCausalLM, transformers.Gemma2Config(
            **base, query_pre_attn_scalar=int(c.query_pre_attn_scalar), sliding_window=c.sliding_window,
            layer_types=types)
    return transformers.Gemma3ForCausalLM, transformers.Gemma3TextConfig(
        **base, query_pre_attn_scalar=int(c.query_pre_attn_scalar), sliding_window=c.sliding_window,
        layer_types=types, rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": c.rope_scale, "rope_theta": c.rope_base},
            "sliding_attention": {"rope_type": "default", "rope_theta": c.local_rope_base}})


HF_CONFIG_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                    "rms_norm_eps", "rope_parameters", "layer_types", "sliding_window", "query_pre_attn_scalar",
                    "attn_logit_softcapping", "final_logit_softcapping", "tie_word_embeddings")


@pytest.mark.parametrize("preset", ["tiny-gemma1", "tiny-gemma2", "tiny-gemma3"])
def test_hf_round_trip_with_transformers(tmp_path, preset):
    torch.manual_seed(0)
    cls, hf_config = hf_twin(preset)
    theirs = cls(hf_config)
    theirs.save_pretrained(tmp_path / "theirs")
    config, state = ckpt_hf.load(tmp_path / "theirs")
    assert config == PRESETS[preset].replace(name="theirs")
    gemma1 = preset == "tiny-gemma1"
    ref = theirs.state_dict()
    for name, tensor in state.items():
        assert torch.equal(tensor, ref[ckpt_hf.to_hf_name(name, gemma1)]), name

    tok_bytes = tiny_tokenizer_bytes()
    ckpt_hf.save(tmp_path / "ours", config, state, tokenizer_model_bytes=tok_bytes)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32)
    assert type(again) is cls
    assert again.state_dict().keys() == ref.keys()
    assert all(torch.equal(again.state_dict()[k], ref[k]) for k in ref)
    for field in HF_CONFIG_FIELDS:
        assert getattr(again.config, field, None) == getattr(theirs.config, field, None), field
    assert ckpt_hf.read_config(tmp_path / "ours") == config.replace(name="ours")
    assert (tmp_path / "ours" / "tokenizer.model").read_bytes() == tok_bytes
    assert checkpoints.detect_format(tmp_path / "ours") == "hf"


def tiny_tokenizer_bytes() -> bytes:
    """A real tokenizer.model: the embedded tokenizer cut to the tiny presets' 512 ids."""
    import opengemma

    return opengemma.load("tiny-gemma1").tokenizer.model_bytes()


# Benign conversations (format_chat, unlike the template, also refuses to let message text spell a
# control token; for text that does not, both give the same ids).
CONVERSATIONS = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "Answer briefly. "}, {"role": "user", "content": "  Knock knock.\n"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?\n\n"},
     {"role": "user", "content": "Write\ta haiku  about   spaces, 数字 and 🎉"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}, {"role": "model", "content": "b"},
     {"role": "user", "content": "c"}],
]


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@pytest.fixture
def one_thread():
    """A tiny model's ops are too small to share out: on a busy 2-core machine two threads only
    wait for each other (this test took 30 s instead of 8)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_hf_export_is_a_complete_transformers_checkpoint(tmp_path, one_thread):
    # Issue 13, item 6: `convert --to hf` as transformers loads Google's checkpoints: <bos> added,
    # the chat template, both stop ids, ordinary file modes; greedy text equal to opengemma's.
    import opengemma
    from opengemma import cli
    from opengemma.chat import format_chat
    from opengemma.generate import GenerationConfig, generate

    dst = tmp_path / "hf"
    assert cli.main(["convert", "tiny-gemma3", str(dst), "--to", "hf"]) == 0
    files = {"config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json",
             "special_tokens_map.json", "generation_config.json"}
    assert {p.name for p in dst.iterdir()} == files  # no temp files left either
    assert {p.stat().st_mode & 0o777 for p in dst.iterdir()} == {0o666 & ~_current_umask()}
    ours = opengemma.load("tiny-gemma3")  # the same seeded weights convert wrote

    tok = transformers.AutoTokenizer.from_pretrained(dst)
    prompt = "The three primary colors are"
    assert tok(prompt).input_ids == ours.tokenizer.encode(prompt, bos=True)
    assert tok(prompt).input_ids[0] == tok.bos_token_id == 2
    assert tok.decode([2, 105, 108, 106, 1], skip_special_tokens=True) == "\n\n"
    for messages in CONVERSATIONS:
        assert tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True
                                       )["input_ids"] == format_chat(ours.tokenizer, messages).ids, messages
    with pytest.raises(Exception, match="alternate"):  # the template refuses what format_chat refuses
        tok.apply_chat_template([{"role": "model", "content": "x"}], tokenize=False)

    model = transformers.AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    assert model.generation_config.eos_token_id == [ours.tokenizer.eos_id, ours.tokenizer.end_of_turn_id]
    for text in (prompt, "Once upon a time"):
        ids = tok(text, return_tensors="pt").input_ids
        with torch.no_grad():
            theirs = model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:].tolist()
        mine = generate(ours.model, ours.tokenizer, [ids[0].tolist()], GenerationConfig(max_new_tokens=24))[0]
        if mine.finish_reason == "stop":  # transformers keeps the stop token that ended the text
            assert theirs[-1] in ours.tokenizer.stop_ids
            theirs = theirs[:-1]
        assert theirs == mine.token_ids and len(mine.token_ids) > 0


def test_hf_chat_template_with_the_full_vocabulary(tmp_path, tokenizer):
    # The template with the embedded model's whole 262k vocabulary (whitespace runs, newlines,
    # multi-byte text as real pieces rather than bytes).
    from opengemma.chat import format_chat

    config = PRESETS["tiny-gemma3"]
    ckpt_hf.save(tmp_path, config, random_state(config), tokenizer_model_bytes=tokenizer.model_bytes())
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for messages in CONVERSATIONS:
        assert tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True
                                       )["input_ids"] == format_chat(tokenizer, messages).ids, messages
    config_json = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert (config_json["add_bos_token"], config_json["add_eos_token"]) == (True, False)
    assert json.loads((tmp_path / "generation_config.json").read_text()) == {
        "bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0}


@pytest.mark.slow
def test_hf_export_of_the_embedded_model_generates_the_same(tmp_path, real_gemma, tokenizer):
    # The issue's case: transformers continued "The three primary colors are" with " not." (no
    # <bos>); with the exported tokenizer files it adds <bos> and gives opengemma's greedy tokens.
    from opengemma.generate import GenerationConfig, generate

    ckpt_hf.save(tmp_path, real_gemma.config, real_gemma.model.state_dict(),
                 tokenizer_model_bytes=tokenizer.model_bytes())
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    prompt = "The three primary colors are"
    ids = tok(prompt, return_tensors="pt").input_ids
    assert ids[0].tolist() == tokenizer.encode(prompt, bos=True)
    with torch.no_grad():
        theirs = model.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:].tolist()
    mine = generate(real_gemma.model, tokenizer, [ids[0].tolist()], GenerationConfig(max_new_tokens=16))[0]
    assert mine.finish_reason == "length" and theirs == mine.token_ids


def test_hf_legacy_and_partial_configs(tmp_path):
    """Older key layouts and configs that lean on transformers' defaults, vs transformers' reading."""
    cases = {
        # Gemma 1 as released: "gelu" means the tanh approximation.
        "g1": {"model_type": "gemma", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16, "vocab_size": 512,
               "hidden_act": "gelu", "rope_theta": 10000.0},
        # Gemma 2 without layer_types: alternating, starting local.
        "g2": {"model_type": "gemma2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 5,
               "num_attention_heads": 4, "head_dim": 16, "vocab_size": 512, "sliding_window": 8},
        # Gemma 3 before transformers 4.5x: rope_scaling / rope_local_base_freq / sliding_window_pattern.
        "g3": {"model_type": "gemma3_text", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 7,
               "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512,
               "rope_theta": 500000.0, "rope_local_base_freq": 20000.0, "sliding_window_pattern": 3,
               "rope_scaling": {"rope_type": "linear", "factor": 4.0}, "sliding_window": 8},
    }
    for name, raw in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(raw))
        ours = ckpt_hf.read_config(tmp_path / name)
        theirs = transformers.AutoConfig.from_pretrained(tmp_path / name)
        types = getattr(theirs, "layer_types", None) or ["full_attention"] * theirs.num_hidden_layers
        assert [t == "sliding_attention" for t in types] == [ours.is_local(i) for i in range(ours.n_layers)]
        assert (ours.n_kv_heads, ours.context_length) == (theirs.num_key_value_heads, theirs.max_position_embeddings)
        if name == "g3":
            assert (ours.rope_base, ours.rope_local_base, ours.rope_scale) == (500000.0, 20000.0, 4.0)
            assert theirs.rope_parameters["full_attention"]["factor"] == 4.0
            assert theirs.rope_parameters["sliding_attention"]["rope_theta"] == 20000.0

    # google/gemma-3-4b-it's config.json: its text_config names only six keys.
    raw = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
           "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                           "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                           "sliding_window": 1024},
           "vision_config": {"model_type": "siglip_vision_model"}}
    (tmp_path / "g3-4b").mkdir()
    (tmp_path / "g3-4b" / "config.json").write_text(json.dumps(raw))
    assert ckpt_hf.read_config(tmp_path / "g3-4b") == PRESETS["gemma3-4b"].replace(name="g3-4b")


def tiny_multimodal(tmp_path):
    text = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, sliding_window=8, query_pre_attn_scalar=16)
    vision = dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=7)
    cfg = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                    image_token_index=500, boi_token_index=498, eoi_token_index=499)
    model = transformers.Gemma3ForConditionalGeneration(cfg)
    model.save_pretrained(tmp_path)
    return model


def test_hf_multimodal_gemma3_text_part(tmp_path):
    torch.manual_seed(0)
    model = tiny_multimodal(tmp_path / "a")
    config, state = ckpt_hf.load(tmp_path / "a")
    assert config.qk_norm and config.n_layers == 6 and config.vocab_size == 512
    ref = {k.replace("model.language_model.", "model."): v for k, v in model.state_dict().items()}
    for name, tensor in state.items():
        assert torch.equal(tensor, ref[ckpt_hf.to_hf_name(name, False)]), name
    # The newer on-disk layout (transformers >= 4.52) holds the same text model.
    tensors = load_file(tmp_path / "a" / "model.safetensors")
    renamed = {k.replace("language_model.model.", "model.language_model."): v for k, v in tensors.items()}
    (tmp_path / "b").mkdir()
    save_file(renamed, tmp_path / "b" / "model.safetensors")
    shutil.copy(tmp_path / "a" / "config.json", tmp_path / "b" / "config.json")
    config_b, state_b = ckpt_hf.load(tmp_path / "b")
    assert config_b == config.replace(name="b")
    assert all(torch.equal(state_b[k], state[k]) for k in state)


def test_hf_sharded_and_dtype(tmp_path):
    torch.manual_seed(0)
    cls, hf_config = hf_twin("tiny-gemma2")
    theirs = cls(hf_config).to(torch.bfloat16)
    theirs.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    _, state = ckpt_hf.load(tmp_path, dtype="bfloat16")
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    assert torch.equal(state["layers.3.post_mlp_norm.weight"],
                       theirs.state_dict()["model.layers.3.post_feedforward_layernorm.weight"])
    _, state32 = checkpoints.load(tmp_path)
    assert all(t.dtype == torch.float32 and torch.equal(t, state[k].float()) for k, t in state32.items())


# -- native -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_round_trip(tmp_path, dtype):
    config = PRESETS["tiny-gemma3"]
    state = {k: v.to(dtype) for k, v in random_state(config).items()}
    ckpt_native.save(tmp_path / "m", config, state, tokenizer_model_bytes=b"proto")
    assert ckpt_native.is_native(tmp_path / "m") and checkpoints.detect_format(tmp_path / "m") == "native"
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert (meta["format"], meta["format_version"]) == ("opengemma", 1)
    assert ckpt_native.read_config(tmp_path / "m") == config
    got_config, got = checkpoints.load(tmp_path / "m", dtype=dtype)
    assert got_config == config and all(torch.equal(got[k], state[k]) for k in state)
    assert checkpoints.tokenizer_file(tmp_path / "m").read_bytes() == b"proto"
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors", "tokenizer.model"]


def test_native_save_is_atomic(tmp_path, monkeypatch):
    config = PRESETS["tiny-gemma1"]
    ckpt_native.save(tmp_path, config, random_state(config, seed=1))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_native, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt_native.save(tmp_path, config, random_state(config, seed=2))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # old files intact, no temp left
    assert torch.equal(ckpt_native.load(tmp_path)[1]["embed.weight"], random_state(config, seed=1)["embed.weight"])


# -- errors: one clear line for every bad input ------------------------------------------------------
@pytest.mark.parametrize("loader", [ckpt_gguf.load, ckpt_gguf.read_config, ckpt_gguf.tensor_types, ckpt_hf.load,
                                    ckpt_hf.read_config, ckpt_native.load, checkpoints.load])
def test_missing_path(tmp_path, loader):
    with pytest.raises(OpenGemmaError) as e:
        loader(tmp_path / "nope")
    one_line(e, "no such file", "nope")


def test_truncated_real_gguf(tmp_path, gguf_path):
    header = ckpt_gguf.read_header(gguf_path)
    cuts = {"header": 10, "metadata": 3_000_000, "tensor infos": header.data_offset - 200,
            "tensor data": header.file_size - 1000}
    assert cuts["metadata"] < header.tensors[0].offset - 100_000
    for size in cuts.values():
        cut = tmp_path / f"cut-{size}.gguf"
        with open(gguf_path, "rb") as src, open(cut, "wb") as dst:
            while dst.tell() < size:
                dst.write(src.read(min(1 << 24, size - dst.tell())))
        for fn in (ckpt_gguf.read_config, ckpt_gguf.load):
            with pytest.raises(OpenGemmaError) as e:
                fn(cut)
            one_line(e, "corrupt or truncated GGUF", cut.name)
        cut.unlink()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # fuzzed fp16 scales decode to inf/nan
def test_garbage_and_fuzzed_gguf(tmp_path):
    rng = np.random.default_rng(0)
    garbage = tmp_path / "garbage.gguf"
    for data in (b"", b"GGUF", rng.bytes(4096), b"GGUF" + rng.bytes(4096)):
        garbage.write_bytes(data)
        with pytest.raises(OpenGemmaError) as e:
            ckpt_gguf.load(garbage)
        one_line(e, "garbage.gguf")
    # Flip bytes of a valid file's header: every outcome is a clean load or one OpenGemmaError line.
    good = write_gguf(tmp_path / "good.gguf", PRESETS["tiny-gemma3"], random_state(PRESETS["tiny-gemma3"]), Q.Q8_0)
    original = good.read_bytes()
    header_end = ckpt_gguf.read_header(good).data_offset
    fuzzed, outcomes = tmp_path / "fuzzed.gguf", {"ok": 0, "error": 0}
    for _ in range(300):
        data = bytearray(original)
        for pos in rng.integers(0, header_end, size=rng.integers(1, 4)):
            data[pos] = rng.integers(0, 256)
        fuzzed.write_bytes(bytes(data))
        try:
            ckpt_gguf.load(fuzzed)
            outcomes["ok"] += 1
        except OpenGemmaError as e:
            assert "\n" not in str(e)
            outcomes["error"] += 1
    assert outcomes["error"] > 50


def test_gguf_unsupported_architecture_and_quant_type(tmp_path):
    config = PRESETS["tiny-gemma1"]
    path = write_gguf(tmp_path / "llama.gguf", config, random_state(config), arch="llama")
    with pytest.raises(OpenGemmaError) as e:
        ckpt_gguf.load(path)
    one_line(e, "unsupported architecture 'llama'")
    # Q8_K is a valid ggml type (llama.cpp's matmul intermediate) that gguf-py cannot decode.
    state = random_state(QCONFIG)
    q8k = np.zeros((QCONFIG.d_model, QCONFIG.ffn_dim // 256 * gguf.GGML_QUANT_SIZES[Q.Q8_K][1]), np.uint8)
    path = write_gguf(tmp_path / "q8k.gguf", QCONFIG, state, Q.Q8_0,
                      overrides={"layers.0.mlp.down_proj.weight": (q8k, None, Q.Q8_K)})
    assert ckpt_gguf.tensor_types(path)["blk.0.ffn_down.weight"] == "Q8_K"
    with pytest.raises(OpenGemmaError) as e:
        ckpt_gguf.load(path)
    one_line(e, "unsupported quant type Q8_K", "blk.0.ffn_down.weight")


def test_hf_config_errors(tmp_path):
    torch.manual_seed(0)
    cls, hf_config = hf_twin("tiny-gemma2")
    cls(hf_config).save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    for change, needle in [({"hidden_size": None}, "hidden_size"), ({"model_type": "llama"}, "unsupported architecture"),
                           ({"hidden_activation": "gelu"}, "unsupported activation"),
                           ({"num_attention_heads": "four"}, "config"),
                           ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, "yarn")]:
        broken = {k: v for k, v in {**raw, **change}.items() if v is not None}
        (tmp_path / "config.json").write_text(json.dumps(broken))
        with pytest.raises(OpenGemmaError) as e:
            ckpt_hf.load(tmp_path)
        one_line(e, needle)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(OpenGemmaError) as e:
        checkpoints.load(tmp_path)
    one_line(e, "JSON")
    (tmp_path / "config.json").write_text(json.dumps(raw))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(OpenGemmaError) as e:
        ckpt_hf.load(tmp_path)
    one_line(e, "model.safetensors")


def test_native_errors(tmp_path):
    config = PRESETS["tiny-gemma1"]
    ckpt_native.save(tmp_path, config, random_state(config))
    meta = json.loads((tmp_path / "config.json").read_text())
    for change, needle in [({"format_version": 99}, "format_version"), ({"n_heads": 0}, "n_heads"),
                           ({"bogus": 1}, "bogus")]:
        (tmp_path / "config.json").write_text(json.dumps({**meta, **change}))
        with pytest.raises(OpenGemmaError) as e:
            ckpt_native.load(tmp_path)
        one_line(e, needle)
    (tmp_path / "config.json").write_text(json.dumps({**meta, "d_model": 32}))
    with pytest.raises(OpenGemmaError) as e:  # weights of another shape than the config says
        ckpt_native.load(tmp_path)
    one_line(e, "shape")
    with pytest.raises(OpenGemmaError) as e:
        ckpt_native.save(tmp_path / "x", config, {"embed.weight": torch.zeros(3)})
    one_line(e, "lacks tensor")
