"""The command line: ``opengemma <verb>``, one argparse program with subcommands.

  generate  continue a prompt, streaming to stdout
  chat      interactive multi-turn chat (report Tables 3/4 formatter); /reset, /exit, Ctrl-D
  info      a model's or preset's config and parameter counts (Table 2 style)
  convert   GGUF / Hugging Face / opengemma checkpoints into opengemma or Hugging Face layout
  serve     an OpenAI-compatible HTTP server with continuous batching (opengemma.serve)
  eval      the report's benchmarks, memorization and side-by-side evaluation (opengemma.eval)

Every problem with the user's input ends as one line on stderr and exit status 1 (2 for
argument errors, from argparse); interrupts exit with 130. Without --model, the embedded
Gemma 3 270M is used.
"""

from __future__ import annotations

import argparse
import json
import sys

from .errors import OpenGemmaError

EPILOG = ("MODEL is a .gguf file, a Hugging Face or opengemma checkpoint directory, a preset name "
          "(random weights; see `opengemma info --presets`) or a hub id such as google/gemma-2b. "
          "Without --model, the embedded Gemma 3 270M (pretrained, Q4_K_M) is used.")


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (usage is one `--help` away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None, metavar="MODEL", help="model to load (default: embedded 270M)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 on CPU, bf16 on GPU)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--quantize", "-q", choices=["none", "int8", "int4"], default="none",
                   help="weight-only quantization of every linear layer and the tied embedding: int8 per "
                        "channel or int4 in groups of 32 (GGUF 4-bit tensors load as int4 directly)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step with torch.compile (CUDA graphs on GPU); the first "
                        "generation in a process pays the compile time (on a CPU about a minute for a new "
                        "cache size, 10-15 s once inductor's disk cache has it), later ones reuse it: "
                        "worth it for long generations and servers, not for a short one-off")


def _sampling_args(p: argparse.ArgumentParser, max_new: int) -> None:
    p.add_argument("--max-new-tokens", "-n", type=_positive_int, default=max_new,
                   help=f"most tokens to generate (default {max_new}; clamped to the context)")
    p.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy (default), higher = more random")
    p.add_argument("--top-k", type=int, default=None, help="sample among the K most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with mass >= P")
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop when TEXT is generated (repeatable); EOS and <end_of_turn> always stop")


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
    p.add_argument("--chat", action="store_true",
                   help="wrap PROMPT as a user turn and answer as the model turn (instruction-tuned models)")

    p = sub.add_parser("chat", help="interactive multi-turn chat", epilog=EPILOG,
                       description="Chat with the model. History is kept between turns. Commands: /reset clears "
                       "the history, /exit (or Ctrl-D) quits.")
    _model_args(p)
    _sampling_args(p, 512)
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
    p.add_argument("--batch-size", type=_positive_int, default=1, help="sequences for --kv-memory (default 1)")
    p.add_argument("--dtype", default="bfloat16", help="cache dtype for --kv-memory (default bfloat16)")

    p = sub.add_parser("convert", help="convert a checkpoint", epilog=EPILOG,
                       description="Convert SRC (GGUF file, HF or opengemma directory, preset) into DST, a new "
                       "directory in opengemma format (safetensors + config.json + tokenizer.model) or, with "
                       "--to hf, in Hugging Face layout loadable by transformers.")
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    p.add_argument("--to", choices=["opengemma", "hf"], default="opengemma", help="output layout (default opengemma)")
    p.add_argument("--dtype", default="float32", help="dtype of the written weights (default float32)")
    p.add_argument("--force", action="store_true", help="write into DST even if it exists")
    from .eval.cli import add_eval_parser
    from .serve.cli import add_serve_parser

    add_serve_parser(sub)
    add_eval_parser(sub)
    return parser


def _read_prompt(text: str) -> str:
    return sys.stdin.read() if text == "-" else text


def _sampling(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, seed=args.seed, stop=args.stop)


def cmd_generate(args) -> int:
    from .api import load

    prompt = _read_prompt(args.prompt)
    g = load(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize, compile=args.compile)
    if args.chat:
        pieces = g.chat([{"role": "user", "content": prompt}], stream=True, **_sampling(args))
    else:
        pieces = g.stream(prompt, **_sampling(args))
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_chat(args) -> int:
    from .api import load

    g = load(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize, compile=args.compile)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"Chatting with {g.name}. /reset clears the history, /exit or Ctrl-D quits.", file=sys.stderr)
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    base = len(history)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            if interactive:
                print(file=sys.stderr)
            return 0
        text = line.strip()
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            del history[base:]
            print("(history cleared)", file=sys.stderr)
            continue
        if not text:
            continue
        history.append({"role": "user", "content": line})
        if interactive:
            sys.stdout.write("gemma> ")
        reply = []
        for piece in g.chat(history, stream=True, **_sampling(args)):
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history.append({"role": "model", "content": "".join(reply)})


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
    from pathlib import Path

    import torch

    from .api import load_tokenizer, parse_dtype, resolve
    from .checkpoints import gguf as gguf_ckpt
    from .checkpoints import hf as hf_ckpt
    from .checkpoints import native as native_ckpt

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
        module = {"gguf": gguf_ckpt, "hf": hf_ckpt, "native": native_ckpt}[src.kind]
        config, state_dict = module.load(src.path, dtype=dtype)
        tok = load_tokenizer(src, config)
    saver = native_ckpt.save if args.to == "opengemma" else hf_ckpt.save
    saver(dst, config, state_dict, tokenizer_model_bytes=tok.model_bytes())
    print(f"wrote {dst} ({args.to} layout, {config.name}, {args.dtype})", file=sys.stderr)
    return 0


def cmd_serve(args) -> int:
    from .serve.cli import run_serve

    return run_serve(args)


def cmd_eval(args) -> int:
    from .eval.cli import run_eval

    return run_eval(args)


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "info": cmd_info, "convert": cmd_convert,
            "serve": cmd_serve, "eval": cmd_eval}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except OpenGemmaError as e:
        print(f"opengemma: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # `opengemma generate ... | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
