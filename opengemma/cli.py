"""The command line: ``opengemma <verb>``, one argparse program with subcommands.

  generate  continue a prompt, streaming to stdout
  chat      interactive multi-turn chat (report Tables 3/4 formatter); /reset, /exit, Ctrl-D
  info      a model's or preset's config and parameter counts (Table 2 style)
  convert   GGUF / Hugging Face / opengemma checkpoints into opengemma or Hugging Face layout
  serve     an OpenAI-compatible HTTP server with continuous batching (opengemma.serve)
  eval      the report's benchmarks, memorization and side-by-side evaluation (opengemma.eval)
  cache     list or clear the converted-weight cache (opengemma.checkpoints.cache)

Every problem with the user's input ends as one line on stderr and exit status 1 (2 for
argument errors, from argparse); interrupts exit with 130. Flag values are checked by the
argparse types below (ranges, finite numbers), so a bad one is an argparse error before any
model loads. Short flags mean the same in every verb: -m --model, -n --max-new-tokens,
-t --temperature, -q --quantize. Without --model, the embedded Gemma 3 270M is used.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from .errors import OpenGemmaError

EPILOG = ("MODEL is a .gguf file, a Hugging Face or opengemma checkpoint directory, a preset name "
          "(random weights; see `opengemma info --presets`) or a hub id such as google/gemma-2b. "
          "Without --model, the embedded Gemma 3 270M is used: a pretrained (base) model, not "
          "instruction-tuned, so it continues text well but rambles in chat.")
CONVERT_EPILOG = ("SRC is a .gguf file, a Hugging Face or opengemma checkpoint directory, or a preset name "
                  "(random weights; see `opengemma info --presets`).")
_MAX_SHOWN = 60  # characters of a bad value quoted in an error line


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (usage is one `--help` away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see `{self.prog} --help`)\n")


def _one_line(text: str, limit: int = 500) -> str:
    """``text`` as one line of bounded length (bad values may hold newlines or be huge)."""
    text = " ".join(str(text).splitlines())
    return text if len(text) <= limit else text[:limit] + "..."


def _shown(text: str) -> str:
    return repr(text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN] + "...")


def int_range(lo: int | None = None, hi: int | None = None, *, what: str = "", span: str | None = None):
    """An argparse type: a whole number in lo..hi (None: unbounded), with a one-line error
    (``span`` spells the range there, e.g. "[-2**63, 2**64)")."""
    def parse(text: str) -> int:
        try:
            value = int(text.strip().replace("_", ""), 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {_shown(text)}") from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            if span is not None:
                bound = f"must be in {span}"
            elif hi is None:
                bound = f"must be at least {lo}"
            elif lo is None:
                bound = f"must be at most {hi}"
            else:
                bound = f"must be in {lo}..{hi}"
            raise argparse.ArgumentTypeError(f"{bound}{what}, got {_shown(text.strip())}")
        return value

    return parse


def float_range(lo: float, hi: float = math.inf, *, lo_open: bool = False, what: str = "", hint: str = ""):
    """An argparse type: a finite number in [lo, hi] ((lo, hi] with ``lo_open``); NaN and
    infinities are refused (they would reach the sampler as NaN probabilities)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {_shown(text)}{hint}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {_shown(text.strip())}")
        if value < lo or value > hi or (lo_open and value == lo):
            if hi == math.inf:
                bound = f"must be {'>' if lo_open else '>='} {lo:g}"
            else:
                bound = f"must be in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
            raise argparse.ArgumentTypeError(f"{bound}{what}, got {_shown(text.strip())}")
        return value

    return parse


# generate.MAX_TOP_K and generate.SEED_RANGE (GenerationConfig's bounds), spelled out here
# because generate imports torch, which a parser must not (tests check they agree).
MAX_TOP_K = 2**31 - 1
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
MAX_SPECULATE = 64  # generate.MAX_SPECULATE
DRAFT_SPECULATE = 4  # --draft without --speculate
# --speculate auto (generate's default): prompt lookup, <= 4 drafts per forward. Embedded 270M greedy
# decode 0.62-0.74x -> 1.44-1.80x llama.cpp, same text (bench/results/cpu-spec*-xeon.md,
# cpu-default-xeon.md); text that does not repeat gets few drafts, and a draftless step is plain.
AUTO_SPECULATE = 4
_speculate_k = int_range(0, MAX_SPECULATE, what=" (0 = off, or auto)")


def speculate_type(text: str) -> int | None:
    """--speculate's argparse type: "auto" (None) or a draft count K in 0..MAX_SPECULATE."""
    return None if text.strip().lower() == "auto" else _speculate_k(text)


def resolve_speculate(speculate: int | None, *, draft: bool, compile: bool) -> int:
    """The drafts per forward a command decodes with: K as given (at least DRAFT_SPECULATE with a
    draft head, which exists to speculate); "auto" (None) is AUTO_SPECULATE, except with --compile,
    whose compiled decode step speculation would bypass (verification forwards run eagerly)."""
    if draft:
        return speculate or DRAFT_SPECULATE
    if speculate is None:
        return 0 if compile else AUTO_SPECULATE
    return speculate

_positive_int = int_range(1)
seed_type = int_range(SEED_MIN, SEED_MAX, span="[-2**63, 2**64)")
TEMPERATURE = float_range(0.0, what=" (0 = greedy)")


def _stop_text(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None, metavar="MODEL", help="model to load (default: embedded 270M)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bfloat16 where --quantize "
                   "auto picks mixed, else float32 on CPU, bf16 on GPU)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--quantize", "-q", choices=["auto", "none", "int8", "int4", "mixed"], default="auto",
                   help="weight-only quantization of every linear layer and the tied embedding: int8 per "
                        "channel or int4 in groups of 32 (GGUF 4-bit tensors load as int4 directly); "
                        "mixed = int8's weights with the output head read through a 4-bit screen when "
                        "decoding (its top 64 candidates rescored exactly from the 8-bit rows): int8's "
                        "quality, fewer bytes per token. auto (default): mixed with bf16 activations for a "
                        "quantized GGUF file on the CPU (the embedded model: perplexity within 1%% of "
                        "llama.cpp's, about 1.9x fp32's decode speed), none for anything else")
    p.add_argument("--kernels", choices=["auto", "native", "torch"], default="auto",
                   help="CPU kernels of a quantized model's decode steps: native = opengemma's own int8 x int8 "
                        "ones (AVX-512 VNNI; activations rounded to 8 bits per block of 32, as llama.cpp "
                        "does; built with the C compiler at first use), torch = PyTorch's weight-only ones "
                        "(bf16 activations); auto (default): native where the CPU and a compiler allow")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step with torch.compile (CUDA graphs on GPU); the first "
                        "generation in a process pays the compile time (on a CPU about a minute for a new "
                        "cache size, 10-15 s once inductor's disk cache has it), later ones reuse it: "
                        "worth it for long generations and servers, not for a short one-off")
    p.add_argument("--adapter", default=None, metavar="DIR", help="a LoRA adapter (`opengemma train adapter`) "
                   "merged into MODEL's weights at load time; 'default' is the chat adapter shipped for the "
                   "embedded model (its chat turns mostly end; the base model's run on)")


def _sampling_args(p: argparse.ArgumentParser, max_new: int) -> None:
    p.add_argument("--max-new-tokens", "-n", type=_positive_int, default=max_new,
                   help=f"most tokens to generate (default {max_new}); a larger value is cut to what the "
                        "model's context leaves after the prompt")
    p.add_argument("--temperature", "-t", type=TEMPERATURE, default=0.0,
                   help="0 = greedy (default), higher = more random")
    p.add_argument("--top-k", type=int_range(0, MAX_TOP_K, what=" (0 = no limit)"), default=None,
                   help="sample among the K most likely tokens (0 = no limit)")
    p.add_argument("--top-p", type=float_range(0.0, 1.0, lo_open=True), default=None,
                   help="nucleus sampling: smallest set with mass >= P, in (0, 1]")
    p.add_argument("--seed", type=seed_type, default=None,
                   help="random seed for reproducible sampling, in [-2**63, 2**64)")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT", type=_stop_text,
                   help="stop when TEXT is generated (repeatable); EOS and <end_of_turn> always stop")


def _decode_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--speculate", type=speculate_type, default=None, metavar="K",
                   help="speculative decoding: guess up to K next tokens by prompt lookup (what followed the "
                        "latest earlier occurrence of the last few tokens, in the prompt or the text so far) "
                        "and check them all in one forward. Lossless: greedy text is the same (up to float "
                        "near-ties), sampling draws from the same distribution (a seed gives other text than "
                        "with --speculate 0); faster when the text repeats what came before (quotes, lists, "
                        "code, loops: the embedded model's greedy text 1.4-1.8x llama.cpp's speed), about "
                        f"plain speed when it does not. Default auto = {AUTO_SPECULATE} (0 with --compile); 0 = off")
    p.add_argument("--stats", action="store_true",
                   help="after generating, print to stderr: tokens, prefill and decode speed (tokens/s), and "
                        "with --speculate the share of guessed tokens accepted and tokens per forward")
    p.add_argument("--draft", default=None, metavar="DIR",
                   help="speculate with a trained draft head (`opengemma train draft`; DIR or its run directory) "
                        "instead of prompt lookup: it predicts the model's next tokens from the model's own last "
                        f"hidden state. Lossless as --speculate; --speculate K sets the drafts per forward "
                        f"(default {DRAFT_SPECULATE} with --draft)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="opengemma", description="Gemma models in PyTorch: run, chat, inspect, "
                                     "convert.", epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("generate", help="continue a prompt, streaming the text", epilog=EPILOG,
                       description="Continue PROMPT with the model and stream the new text to stdout.")
    p.add_argument("prompt", metavar="PROMPT", help="the text to continue ('-' reads standard input)")
    _model_args(p)
    _sampling_args(p, 128)
    _decode_args(p)
    p.add_argument("--chat", action="store_true",
                   help="wrap PROMPT as a user turn and answer as the model turn (instruction-tuned models)")

    p = sub.add_parser("chat", help="interactive multi-turn chat", epilog=EPILOG,
                       description="Chat with the model. History is kept between turns. Commands: /reset clears "
                       "the history, /exit (or Ctrl-D) quits. Ctrl-C stops a reply (its text so far stays in the "
                       "history) and keeps the session; Ctrl-C twice at the prompt quits. Input lines can be "
                       "edited and recalled (readline); they are saved in $OPENGEMMA_CHAT_HISTORY, else "
                       "~/.cache/opengemma/chat_history (OPENGEMMA_CHAT_HISTORY= keeps none). Use an "
                       "instruction-tuned model: the embedded base model rambles and may not end its turns.")
    _model_args(p)
    _sampling_args(p, 512)
    _decode_args(p)
    p.add_argument("--system", default=None, help="a system prompt (folded into the first user turn)")

    p = sub.add_parser("info", help="show a model's config and parameter counts", epilog=EPILOG,
                       description="Print the config of MODEL (file, directory or preset; default: embedded) "
                       "with embedding and non-embedding parameter counts, as Table 2 of the report counts them.")
    p.add_argument("model", nargs="?", default=None, metavar="MODEL")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--presets", action="store_true", help="list the built-in presets")
    p.add_argument("--kv-memory", action="store_true",
                   help="also show the KV-cache memory for --context tokens (sliding-window layers keep only "
                        "their window)")
    p.add_argument("--context", type=_positive_int, default=None,
                   help="context length for --kv-memory (default: the model's full context)")
    p.add_argument("--batch-size", type=int_range(1, 1 << 20), default=1, help="sequences for --kv-memory (default 1)")
    p.add_argument("--dtype", default="bfloat16", help="cache dtype for --kv-memory (default bfloat16)")

    p = sub.add_parser("convert", help="convert a checkpoint", epilog=CONVERT_EPILOG,
                       description="Convert SRC (GGUF file, HF or opengemma directory, preset) into DST, a new "
                       "directory in opengemma format (safetensors + config.json + tokenizer.model) or, with "
                       "--to hf, in Hugging Face layout: config.json, model.safetensors, tokenizer.model, "
                       "tokenizer_config.json (adds <bos>; the chat template), special_tokens_map.json and "
                       "generation_config.json (stops at <eos> and <end_of_turn>), which transformers' "
                       "AutoTokenizer and AutoModelForCausalLM load as they load Google's checkpoints.")
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    p.add_argument("--to", choices=["opengemma", "hf"], default="opengemma", help="output layout (default opengemma)")
    p.add_argument("--dtype", default="float32", help="dtype of the written weights (default float32)")
    p.add_argument("--force", action="store_true", help="write into DST even if it exists")
    from .eval.cli import add_eval_parser
    from .serve.cli import add_serve_parser

    add_serve_parser(sub)
    add_eval_parser(sub)
    from .data.tokenizer_cli import add_tokenizer_parser; add_tokenizer_parser(sub)  # noqa: E702 (registers its runner)
    from .train.cli import add_train_parser; add_train_parser(sub)  # noqa: E702 (registers its runner)
    from .data.cli import add_data_parser; add_data_parser(sub)  # noqa: E702 (registers its runner)
    from .train.tune_cli import add_reward_parser; add_reward_parser(sub)  # noqa: E702 (registers its runner)

    p = sub.add_parser("cache", help="list or clear the converted-weight cache",
                       description="A GGUF model is converted once (about 1 GB for the embedded 270M in "
                       "float32) and memory-mapped on later starts. `opengemma cache` lists the converted "
                       "models with their sizes and sources; `opengemma cache clear ENTRY...` removes some "
                       "(ENTRY: a unique start of the name shown), `--all` everything. The cache lives in "
                       "$OPENGEMMA_CACHE/converted, else ~/.cache/opengemma/converted; OPENGEMMA_NO_CACHE=1 "
                       "turns it off.")
    p.add_argument("action", nargs="?", choices=["list", "clear"], default="list", help="list (default) or clear")
    p.add_argument("entries", nargs="*", metavar="ENTRY", help="entries to clear")
    p.add_argument("--all", action="store_true", help="with clear: remove every entry")
    p.add_argument("--json", action="store_true", help="with list: machine-readable output")
    return parser


def _read_prompt(text: str) -> str:
    return sys.stdin.read() if text == "-" else text


def _sampling(args, g, stats=None) -> dict:
    # -n is cut to the context here; generation then cuts it to what the prompt leaves.
    drafter = getattr(args, "drafter", None)
    return dict(max_new_tokens=min(args.max_new_tokens, g.config.context_length), temperature=args.temperature,
                top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop,
                speculate=resolve_speculate(args.speculate, draft=drafter is not None, compile=args.compile),
                stats=stats,
                **({"drafter": drafter} if drafter is not None else {}))


def _new_stats(args):
    """A GenerationStats for one generation when --stats asks for it, else None."""
    if not args.stats:
        return None
    from .generate import GenerationStats

    return GenerationStats()


def _load(args):
    from .process import load_for_command

    g = load_for_command(args.model, adapter=getattr(args, "adapter", None), dtype=args.dtype, device=args.device,
                         quantize=args.quantize, compile=args.compile, kernels=args.kernels)
    if getattr(args, "draft", None):  # the draft head for this model (checked against its config)
        from .draft import load_drafter

        args.drafter = load_drafter(args.draft, g.model)
    return g


def cmd_generate(args) -> int:
    prompt = _read_prompt(args.prompt)
    g = _load(args)
    stats = _new_stats(args)
    if args.chat:
        pieces = g.chat([{"role": "user", "content": prompt}], stream=True, **_sampling(args, g, stats))
    else:
        pieces = g.stream(prompt, **_sampling(args, g, stats))
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if stats is not None:
        print(stats.summary(), file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    from .chat_cli import run_chat

    return run_chat(args)


def cmd_info(args) -> int:
    from .config import PRESETS

    if args.presets:
        for name, cfg in PRESETS.items():
            print(f"{name:14s} {cfg.embedding_params:>15,} embedding  {cfg.non_embedding_params:>15,} non-embedding")
        return 0
    from .api import load_config, resolve

    src = resolve(args.model)
    cfg = load_config(args.model)
    info = {"model": src.name, "source": src.kind, "path": str(src.path) if src.path else None,
            "config": cfg.to_dict(), "embedding_params": cfg.embedding_params,
            "non_embedding_params": cfg.non_embedding_params,
            "total_params": cfg.embedding_params + cfg.non_embedding_params}
    if args.kv_memory:
        import torch

        from .api import parse_dtype
        from .model import KVCache

        context = min(args.context or cfg.context_length, cfg.context_length)
        info["kv_memory"] = KVCache.planned_bytes(cfg, context, args.batch_size,
                                                  parse_dtype(args.dtype, torch.device("cpu")))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"model: {info['model']} ({src.kind}{', ' + info['path'] if info['path'] else ''})")
    for key, value in info["config"].items():
        if key == "layer_types" and value:
            n_local = value.count("local")
            value = f"{n_local} local, {len(value) - n_local} global ({' '.join(v[0].upper() for v in value)})"
        print(f"  {key:22s} {value}")
    print(f"  {'embedding_params':22s} {info['embedding_params']:,}")
    print(f"  {'non_embedding_params':22s} {info['non_embedding_params']:,}")
    print(f"  {'total_params':22s} {info['total_params']:,}")
    if "kv_memory" in info:
        kv = info["kv_memory"]
        mib = 2 ** 20
        print(f"kv cache for {kv['context']:,} tokens x {kv['batch_size']} ({kv['dtype']}): "
              f"{kv['total_bytes'] / mib:,.1f} MiB (global layers {kv['global_layers_bytes'] / mib:,.1f} MiB, "
              f"local layers {kv['local_layers_bytes'] / mib:,.1f} MiB; "
              f"{kv['without_windows_bytes'] / mib:,.1f} MiB if every layer kept the whole context)")
    return 0


def cmd_convert(args) -> int:
    import torch

    from .api import load_tokenizer, parse_dtype, resolve
    from .checkpoints import hf as hf_ckpt
    from .checkpoints import native as native_ckpt
    from .checkpoints import reader

    dst = Path(args.dst)
    if dst.exists() and any(dst.iterdir() if dst.is_dir() else [True]) and not args.force:
        raise OpenGemmaError(f"{dst} already exists (use --force to write into it)")
    dtype = parse_dtype(args.dtype, torch.device("cpu"))
    src = resolve(args.src)
    if src.kind == "preset":
        from .api import load

        g = load(src.name, dtype=dtype, device="cpu")
        config, state_dict, tok = g.config, g.model.state_dict(), g.tokenizer
    else:
        config, state_dict = reader(src.kind).load(src.path, dtype=dtype)
        tok = load_tokenizer(src, config)
    saver = native_ckpt.save if args.to == "opengemma" else hf_ckpt.save
    saver(dst, config, state_dict, tokenizer_model_bytes=tok.model_bytes())
    print(f"wrote {dst} ({args.to} layout, {config.name}, {args.dtype})", file=sys.stderr)
    return 0


def cmd_cache(args) -> int:
    import time

    from .checkpoints import cache as weight_cache

    root = weight_cache.cache_root()
    if args.action == "list":
        if args.entries or args.all:
            raise OpenGemmaError("`opengemma cache list` takes no ENTRY or --all (did you mean `cache clear`?)")
        items = weight_cache.entries()
        if args.json:
            print(json.dumps({"root": str(root), "entries": [
                {"name": e.name, "path": str(e.path), "bytes": e.size, "created": e.created, "source": e.source,
                 "options": e.options, "config": e.config_name} for e in items]}, indent=2))
            return 0
        print(f"converted-weight cache: {root}{' (empty)' if not items else ''}")
        for e in items:
            options = ", ".join(f"{k}={v.removeprefix('torch.')}" for k, v in sorted(e.options.items()))
            what = f"{Path(e.source).name if e.source else 'unknown source'} [{e.config_name or '?'}] {options}"
            created = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.created))
            print(f"  {e.name[:12]}  {weight_cache.human_size(e.size):>9}  {created}  {what}")
        if items:
            total = weight_cache.human_size(sum(e.size for e in items))
            print(f"{len(items)} entr{'y' if len(items) == 1 else 'ies'}, {total}; remove with "
                  "`opengemma cache clear ENTRY` or `opengemma cache clear --all`")
        return 0
    if args.json:
        raise OpenGemmaError("--json goes with `opengemma cache list`")
    if args.all == bool(args.entries):
        raise OpenGemmaError("`opengemma cache clear` needs ENTRY... (as `opengemma cache` lists them) or --all")
    if args.all:
        count, size = weight_cache.clear()
        print(f"removed {count} entr{'y' if count == 1 else 'ies'} ({weight_cache.human_size(size)}) from {root}",
              file=sys.stderr)
        return 0
    found = []
    for name in args.entries:
        try:
            entry = weight_cache.find(name)
        except ValueError as e:
            raise OpenGemmaError(str(e)) from None
        if entry is None:
            raise OpenGemmaError(f"no cache entry {_shown(name)} in {root} (`opengemma cache` lists them)")
        found.append(entry)
    for entry in found:
        weight_cache.remove(entry)
        print(f"removed {entry.name[:12]} ({weight_cache.human_size(entry.size)})", file=sys.stderr)
    return 0


def cmd_serve(args) -> int:
    from .serve.cli import run_serve

    return run_serve(args)


def cmd_eval(args) -> int:
    from .eval.cli import run_eval

    return run_eval(args)


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "info": cmd_info, "convert": cmd_convert,
            "serve": cmd_serve, "eval": cmd_eval, "cache": cmd_cache}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except OpenGemmaError as e:
        print(f"opengemma: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # `opengemma generate ... | head`
        return 0
    except OSError as e:  # the environment, not a bug: disk full, permission denied, a path too long
        print(f"opengemma: error: {_one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
