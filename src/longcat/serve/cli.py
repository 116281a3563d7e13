"""`longcat serve`: an OpenAI-compatible HTTP server with continuous batching."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    """Add `longcat serve` to the top-level commands."""
    p = sub.add_parser(
        "serve", help="an OpenAI-compatible HTTP server (completions, chat, streaming) with continuous batching",
        description="Serve a model over HTTP with the OpenAI API: POST /v1/completions, /v1/chat/completions, "
                    "GET /v1/models, /health, /metrics (Prometheus), POST /tokenize, /detokenize, GET /version. "
                    "Requests are batched continuously: each decode step admits waiting requests and retires "
                    "finished ones. docs/SERVING.md has examples.",
    )
    p.add_argument("--model", required=True, metavar="DIR",
                   help="model directory (ours or Hugging Face LongcatFlash) or a training run directory")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="tokenizer.json or a folder with one (default: the one next to the model)")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model id clients send (default: the --model folder's name)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on the /v1 routes (default: no key)")
    p.add_argument("--max-running", type=int, default=16,
                   help="sequences decoding together at most (cache rows; default 16)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests waiting for a row at most; more are refused with 429 (default 256)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context per request, prompt plus completion (default: the model's max_position_embeddings)")
    p.add_argument("--max-cache-tokens", type=int, default=None,
                   help="cache tokens the running requests may reserve together, prompt + max_tokens each "
                        "(default: max-running x max-model-len)")
    p.add_argument("--prefill-chunk", type=int, default=256,
                   help="prompt tokens prefilled per step at most, between decode steps of the running requests "
                        "(default 256; smaller keeps streams smooth while a long prompt arrives)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step: fastest at small batches, after a compilation per batch "
                        "bucket on first use (the first requests wait for it)")
    p.add_argument("--speculative", type=int, default=0, metavar="K",
                   help="MTP speculative decoding with K draft tokens per step (default 0 = off); greedy output "
                        "is unchanged")
    p.add_argument("--max-request-bytes", type=int, default=4 << 20,
                   help="largest request body accepted; larger ones get 413 (default 4 MiB)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="weights and cache dtype (default: as stored)")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N, ..., or auto (default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--nproc", type=int, default=None,
                   help="processes for a parallel engine: not available yet (one process serves)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default warning)")
    p.set_defaults(func=run)


def _error(message: str):
    from ..errors import UserError

    return UserError(message)


def build_server(args: argparse.Namespace):
    """The Server for the parsed arguments (model loaded, scheduler built, engine thread not started)."""
    import torch

    from .. import load
    from ..devices import resolve_device
    from ..infer.cli import find_tokenizer, load_tokenizer, resolve_model_dir
    from ..infer.engine import Engine
    from ..infer.sampling import GenerationError
    from ..infer.scheduler import Scheduler, SchedulerConfig
    from ..interop.safetensors_io import CheckpointError
    from .app import Server, ServerSettings, read_chat_template

    checks = [
        ("--port", 0 <= args.port <= 65535, f"must be in [0, 65535], got {args.port}"),
        ("--max-running", args.max_running >= 1, f"must be >= 1, got {args.max_running}"),
        ("--max-queue", args.max_queue >= 1, f"must be >= 1, got {args.max_queue}"),
        ("--max-model-len", args.max_model_len is None or args.max_model_len >= 2,
         f"must be >= 2, got {args.max_model_len}"),
        ("--max-cache-tokens", args.max_cache_tokens is None or args.max_cache_tokens >= 2,
         f"must be >= 2, got {args.max_cache_tokens}"),
        ("--prefill-chunk", args.prefill_chunk >= 1, f"must be >= 1, got {args.prefill_chunk}"),
        ("--speculative", args.speculative >= 0, f"must be >= 0, got {args.speculative}"),
        ("--max-request-bytes", args.max_request_bytes >= 1024, f"must be >= 1024, got {args.max_request_bytes}"),
        ("--threads", args.threads is None or args.threads >= 1, f"must be >= 1, got {args.threads}"),
        ("--api-key", args.api_key is None or args.api_key.strip() != "", "must not be empty"),
    ]
    for flag, ok, rule in checks:
        if not ok:
            raise _error(f"{flag} {rule}")
    if args.nproc is not None and args.nproc != 1:
        raise _error(f"--nproc {args.nproc}: serving from several processes is not available yet; leave --nproc out "
                     "to serve from one process (the model must fit one device)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model_dir = resolve_model_dir(args.model)
    tok_path = Path(args.tokenizer) if args.tokenizer else find_tokenizer(model_dir, Path(args.model))
    tokenizer = load_tokenizer(tok_path) if tok_path is not None else None
    device = resolve_device(args.device, setting="--device")
    try:
        model = load(model_dir, device=device, dtype=getattr(torch, args.dtype) if args.dtype else None)
    except CheckpointError as exc:
        raise _error(str(exc)) from exc
    model.eval()
    limit = model.config.max_position_embeddings
    if args.max_model_len is not None and args.max_model_len > limit:
        raise _error(f"--max-model-len {args.max_model_len} is beyond the model's max_position_embeddings ({limit}); "
                     "give at most that")
    try:
        engine = Engine(model, tokenizer, max_seq_len=args.max_model_len, speculative=args.speculative,
                        compile=args.compile)
        scheduler = Scheduler(engine, SchedulerConfig(max_running=args.max_running, max_queue=args.max_queue,
                                                      max_cache_tokens=args.max_cache_tokens,
                                                      prefill_chunk=args.prefill_chunk))
    except GenerationError as exc:
        raise _error(str(exc)) from exc
    folders = [model_dir, model_dir.parent] + ([tok_path.parent] if tok_path is not None else [])
    name = args.served_model_name or Path(args.model).resolve().name
    settings = ServerSettings(model_name=name, api_key=args.api_key, max_body_bytes=args.max_request_bytes,
                              chat_template=read_chat_template(folders))
    return Server(scheduler, settings)


def run(args: argparse.Namespace) -> int:
    import socket
    import sys

    import uvicorn

    from .app import create_app

    server = build_server(args)
    app = create_app(server)
    # proto given explicitly: asyncio turns Nagle's algorithm off only on sockets marked IPPROTO_TCP,
    # and with it on, a keep-alive client waits for a delayed ACK (tens of ms) on every response
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM,
                         socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as exc:
        raise _error(f"cannot listen on {args.host}:{args.port}: {exc.strerror}; pick another --port "
                     "(0 = any free one)") from None
    host, port = sock.getsockname()[:2]
    print(f"longcat serve: '{server.settings.model_name}' on http://{host}:{port}/v1 "
          f"(max {args.max_running} running, context {server.max_model_len})", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
    return 0
