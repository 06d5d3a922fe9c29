"""The peer engines of ``bench_inference.py``: Hugging Face transformers and llama.cpp.

Driven by the worker process of ``inference_engines.py`` with the same interface as its opengemma
engines (``prefill``, ``decode``, ``ppl``). Importing this module takes only the standard library:
each engine imports its own package when it is built, so a llama.cpp cold start never pays for
torch or transformers.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

NLL_ROWS = 128  # log-softmax over the 262k-entry vocabulary this many positions at a time


def hf_load(gguf: str):
    """transformers' model (fp32, default attention) and tokenizer from the GGUF -> (model, tok, how).

    ``from_pretrained(dir, gguf_file=name)`` needs ``accelerate`` for GGUF files. Without it we take
    the same steps by hand (what tests/conftest.py does): ``load_gguf_checkpoint`` dequantizes the
    file, ``from_config`` builds the model, and the tensors are assigned; ``how`` says which ran.
    """
    import importlib.util

    import torch
    import transformers

    path = Path(gguf)
    if importlib.util.find_spec("accelerate") is not None:
        model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                  dtype=torch.float32)
        how = "from_pretrained"
    else:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        parsed = load_gguf_checkpoint(str(path))
        config = transformers.AutoConfig.for_model(**parsed["config"])
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model,
                                       torch_dtype=torch.float32)["tensors"]
        result = model.load_state_dict(tensors, strict=False, assign=True)
        model.tie_weights()
        expected = {n for n, _ in model.named_parameters()}  # tied weights are listed once
        missing = sorted(expected & set(result.missing_keys))
        if missing or result.unexpected_keys:
            raise RuntimeError(f"transformers fallback load: missing {missing[:3]}, "
                               f"unexpected {result.unexpected_keys[:3]}")
        how = "load_gguf_checkpoint + from_config (accelerate not installed)"
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model.eval(), tok, how


class TransformersEngine:
    """transformers: the GGUF in fp32 (default attention, see :func:`hf_load`), forward with
    ``logits_to_keep=1`` for prefill, and a manual greedy loop over its DynamicCache for decode."""

    def __init__(self, s: dict, engine: str):
        import torch

        self.torch = torch
        t = time.perf_counter()
        import transformers

        self.import_s = time.perf_counter() - t
        t = time.perf_counter()
        self.model, self.tok, how = hf_load(s["gguf"])
        self.load_s = time.perf_counter() - t
        self.info = {"transformers": transformers.__version__, "load": how,
                     "attn_implementation": getattr(self.model.config, "_attn_implementation", None),
                     # every parameter once (the tied head with the embedding): what a decode step reads
                     "decode_weight_bytes": sum(p.numel() * p.element_size() for p in self.model.parameters())}

    def encode(self, text: str) -> list[int]:
        return self.tok(text).input_ids

    def _prefill_out(self, ids: list[int]):
        x = self.torch.tensor([ids], dtype=self.torch.long)
        return self.model(input_ids=x, use_cache=True, logits_to_keep=1)

    def prefill(self, ids: list[int], max_len: int):
        with self.torch.inference_mode():
            return self._prefill_out(ids).logits[:, -1]

    def decode(self, ids: list[int], steps: int, max_len: int) -> tuple[list[float], list[int]]:
        torch = self.torch
        P = len(ids)
        times, out = [], []
        with torch.inference_mode():
            o = self._prefill_out(ids)
            past, logits = o.past_key_values, o.logits[:, -1]
            for i in range(steps):
                t = time.perf_counter()
                nxt = logits.argmax(-1)  # [1]
                out.append(nxt.item())
                o = self.model(input_ids=nxt[:, None], past_key_values=past, use_cache=True,
                               cache_position=torch.tensor([P + i]), logits_to_keep=1)
                past, logits = o.past_key_values, o.logits[:, -1]
                times.append(time.perf_counter() - t)
            out.append(int(logits.argmax(-1).item()))
        return times, out

    def ppl(self, ids: list[int]) -> float:
        """One forward over all ids (no cache), log_softmax in fp32, mean NLL of tokens 1..N-1."""
        torch = self.torch
        with torch.inference_mode():
            logits = self.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]  # [N, V]
            tgt = torch.tensor(ids[1:])
            nll = 0.0
            for i in range(0, len(ids) - 1, NLL_ROWS):
                lp = torch.log_softmax(logits[i:i + NLL_ROWS].float(), dim=-1)  # [rows, V]
                nll -= lp.gather(-1, tgt[i:i + NLL_ROWS, None]).double().sum().item()
        return math.exp(nll / (len(ids) - 1))


class LlamaCppEngine:
    """llama.cpp through llama-cpp-python: ``Llama(model_path)``, ``eval(ids)``, greedy from the
    context's last logits; perplexity from a second context with ``logits_all``."""

    def __init__(self, s: dict, engine: str):
        t = time.perf_counter()
        import llama_cpp
        import numpy as np

        self.import_s = time.perf_counter() - t
        self.np, self.llama_cpp, self.s = np, llama_cpp, s
        t = time.perf_counter()
        self.llm = llama_cpp.Llama(model_path=s["gguf"], n_ctx=s["prompt_tokens"] + s["decode_tokens"] + 16,
                                   n_batch=max(512, s["prompt_tokens"]), n_threads=s["threads"],
                                   n_threads_batch=s["threads"], logits_all=False, verbose=False)
        self.load_s = time.perf_counter() - t
        self.info = {"llama_cpp": getattr(llama_cpp, "__version__", "?")}  # its bytes per token: the parent's

    def encode(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)

    def _last_logits(self):
        # Without logits_all, Llama.eval keeps no scores (sampling moved into llama.cpp): read the
        # context's logits of the last evaluated token directly. A view, valid until the next eval.
        return self.np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),))

    def prefill(self, ids: list[int], max_len: int):
        self.llm.reset()
        self.llm.eval(ids)
        return self._last_logits()

    def decode(self, ids: list[int], steps: int, max_len: int) -> tuple[list[float], list[int]]:
        np = self.np
        logits = self.prefill(ids, max_len)
        times, out = [], []
        for _ in range(steps):
            t = time.perf_counter()
            nxt = int(np.argmax(logits))
            out.append(nxt)
            self.llm.eval([nxt])
            logits = self._last_logits()
            times.append(time.perf_counter() - t)
        out.append(int(np.argmax(logits)))
        return times, out

    def ppl(self, ids: list[int]) -> float:
        """All logits need ``logits_all``: a second context just for this, freed afterwards."""
        np, N, s = self.np, len(ids), self.s
        llm = self.llama_cpp.Llama(model_path=s["gguf"], n_ctx=N + 16, n_batch=max(1024, N),
                                   n_threads=s["threads"], n_threads_batch=s["threads"],
                                   logits_all=True, verbose=False)
        try:
            llm.eval(ids)
            scores = llm.scores[:N]  # [N, V] float32
            nll = 0.0
            for i in range(0, N - 1, NLL_ROWS):
                x = scores[i:min(i + NLL_ROWS, N - 1)]
                m = x.max(axis=1)
                lse = m + np.log(np.exp(x - m[:, None]).sum(axis=1, dtype=np.float64))
                nll += float((lse - x[np.arange(len(x)), ids[i + 1:i + 1 + len(x)]]).sum())
        finally:
            getattr(llm, "close", lambda: None)()
            del llm
        return math.exp(nll / (N - 1))
