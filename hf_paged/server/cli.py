"""``hf-paged serve``: load a model, build the engine and the app, run uvicorn."""

from __future__ import annotations

import argparse
import errno
import functools
import logging
import os
import socket
import sys
from collections.abc import Sequence

from ..loader import load_model, resolve_device
from .api_servers import run_app

__all__ = ["build_parser", "main"]

logger = logging.getLogger("hf_paged.server")

_DTYPES = ("auto", "bfloat16", "float16", "float32")


def build_parser() -> argparse.ArgumentParser:
    """The ``hf-paged`` argument parser (subcommand ``serve``)."""
    parser = argparse.ArgumentParser(prog="hf-paged", description="hf_paged command line")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve", help="OpenAI-compatible HTTP server", description="Serve a model over an OpenAI-compatible API."
    )
    serve.add_argument("model", nargs="?", help="model + tokenizer: a save_pretrained directory or a hub id")
    serve.add_argument("--demo", action="store_true",
                       help="serve SmolLM2-135M-Instruct, a small real chat model fetched and converted once "
                            "(hf_paged.demo_model); a tiny random model when it cannot be had")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--dtype", choices=_DTYPES, default="auto", help="model dtype (auto: the checkpoint's)")
    serve.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    serve.add_argument("--served-model-name", default=None, help="name clients pass as `model` (default: dir name)")
    serve.add_argument("--max-num-seqs", type=_positive_int, default=256, help="sequences running at once")
    serve.add_argument("--max-model-len", type=_positive_int, default=None,
                       help="prompt + output tokens per request (default: the model's max_position_embeddings)")
    serve.add_argument("--allow-long-max-model-len", action="store_true",
                       help="accept a --max-model-len above the model's max_position_embeddings (outputs past it "
                            "may be garbage)")
    pool = serve.add_mutually_exclusive_group()
    pool.add_argument("--num-blocks", type=_positive_int, default=None, help="KV pool size in blocks")
    pool.add_argument("--kv-memory-fraction", type=_fraction, default=None,
                      help="size the KV pool from this fraction of free device memory")
    serve.add_argument("--block-size", type=_positive_int, default=16, help="tokens per KV block")
    serve.add_argument("--api-key", default=os.environ.get("HF_PAGED_API_KEY"),
                       help="require `Authorization: Bearer KEY` on /v1 (default: $HF_PAGED_API_KEY)")
    serve.add_argument("--max-request-bytes", type=_positive_int, default=16 * 2**20,
                       help="largest request body accepted (413 above it; default 16 MiB)")
    serve.add_argument("--max-n", type=_positive_int, default=64,
                       help="largest n (samples per prompt) a request may ask for (400 above it)")
    serve.add_argument("--max-waiting", type=_non_negative_int, default=None,
                       help="requests allowed to wait for their first token before 429 (default: unbounded)")
    serve.add_argument("--chat-template", default=None, metavar="FILE", help="Jinja chat template file")
    serve.add_argument("--shutdown-timeout", type=_non_negative_float, default=3.0, metavar="S",
                       help="on SIGINT/SIGTERM, seconds in-flight requests may finish before being aborted")
    serve.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=None,
                       help="run the engine loop in a process of its own (its own GIL, fed over ZMQ IPC) rather "
                            "than in a thread of the server process (default: on for CUDA devices, off on CPU)")
    serve.add_argument("--api-server-count", type=_positive_int, default=None, metavar="N",
                       help="N front-end processes (HTTP, chat templates, detokenization, SSE) sharing the port "
                            "and one engine process (implies --engine-process; Linux); one front end saturates "
                            "a core near 17k streamed tokens/s. Default: on one CUDA GPU with the engine in its "
                            "own process, min(4, CPU cores / 4); else 1")
    serve.add_argument("--tensor-parallel-size", type=_positive_int, default=1, metavar="N",
                       help="shard MODEL over N local GPUs (N CPU processes over gloo without CUDA) with "
                            "Transformers' tp_plan; rank 0's engine runs in a thread of this process, or with "
                            "--engine-process in the engine process, which starts the other ranks")
    serve.add_argument("--compile-model", action="store_true",
                       help="Engine(compile_model=True): torch.compile the model around the paged-attention op "
                            "(experimental; the first start compiles for minutes)")
    serve.add_argument("--data-parallel-size", type=_positive_int, default=1, metavar="N",
                       help="N engine replicas as Ray actors (one GPU each where Ray finds GPUs) behind a router "
                            "that sends each request where the least work is reserved (prefix affinity; a "
                            "replica's death replays its requests elsewhere); needs the 'ray' extra")
    serve.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hf-paged`` console script."""
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    return 2  # pragma: no cover (argparse requires a command)


def _serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    if args.demo == bool(args.model):
        parser.error("serve needs a MODEL directory or --demo (not both)")
    chat_template = None
    if args.chat_template:
        try:
            with open(args.chat_template, encoding="utf-8") as f:
                chat_template = f.read()
        except OSError as e:
            parser.error(f"cannot read --chat-template: {e}")
    if args.model:
        _check_model_argument(parser, args.model)
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        parser.error(f"--device: {e}")
    if args.tensor_parallel_size > 1 and args.data_parallel_size > 1:
        parser.error("--tensor-parallel-size and --data-parallel-size cannot be combined yet")
    if args.data_parallel_size > 1:
        if args.engine_process:
            parser.error("--engine-process is not supported with --data-parallel-size (its engines run in Ray "
                         "actors of their own already)")
        args.engine_process = False
    if args.api_server_count is None:
        # Measured on an H100 (16 cores, SmolLM2): 1 front end 122 req/s, 4 front ends 343 req/s.
        auto = (device.type == "cuda" and args.tensor_parallel_size == 1 and args.data_parallel_size == 1
                and args.engine_process is not False and sys.platform == "linux")
        args.api_server_count = max(1, min(4, (os.cpu_count() or 1) // 4)) if auto else 1
    if args.api_server_count > 1:
        if args.data_parallel_size > 1 or args.engine_process is False:
            parser.error("--api-server-count > 1 needs the engine in a process of its own (not --no-engine-process "
                         "or --data-parallel-size)")
        args.engine_process = True
    if args.engine_process is None:
        # Measured on an H100: more requests/s and a steadier ITL in a process of its own (one GPU; under
        # tensor parallelism not measured yet, so rank 0's engine stays in a thread unless asked).
        args.engine_process = device.type == "cuda" and args.tensor_parallel_size == 1
    _check_port_free(parser, args.host, args.port)


    from ..engine import Engine
    from .app import build_app
    from .config import ServerConfig
    from .demo import DEMO_MODEL_NAME, build_demo_tokenizer

    engine_kwargs = {"num_blocks": args.num_blocks, "memory_fraction": args.kv_memory_fraction,
                     "block_size": args.block_size, "max_num_seqs": args.max_num_seqs}
    if args.compile_model:
        engine_kwargs["compile_model"] = True
    model_path, load_error = None, ""  # None: the tiny random demo model
    dtype = args.dtype
    if args.demo:
        from ..demo_model import DEMO_MODEL_HUB_ID, DemoModelUnavailable, demo_model_dir

        try:
            demo_dir = demo_model_dir()
        except DemoModelUnavailable as e:
            demo_dir = None
            logger.warning("real demo model unavailable (%s): serving a tiny random model instead", e)
        if demo_dir is not None:
            # "auto" is the checkpoint's bfloat16: right on GPUs; most CPUs run float32 faster.
            cpu = resolve_device(args.device).type == "cpu"
            dtype = "float32" if args.dtype == "auto" and cpu else args.dtype
            model_path, load_error = str(demo_dir), "cannot load the demo model"
            name = args.served_model_name or DEMO_MODEL_HUB_ID.split("/")[-1]
            source = f"demo {demo_dir}"
        else:
            name = args.served_model_name or DEMO_MODEL_NAME
            source = "demo (random weights)"
    else:
        model_path, load_error = args.model, f"cannot load MODEL {args.model!r}"
        name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
        source = args.model
    config = ServerConfig(model_name=name, max_model_len=args.max_model_len, api_key=args.api_key,
                          max_waiting=args.max_waiting, chat_template=chat_template, max_n=args.max_n,
                          max_request_bytes=args.max_request_bytes,
                          allow_long_max_model_len=args.allow_long_max_model_len)
    if args.engine_process:
        from ..engine.core_process import engine_factory
        from ..engine.process_client import EngineProcessClient, EngineStartError
        from ..loader import load_tokenizer

        tp = args.tensor_parallel_size
        if model_path is None:
            if tp > 1:
                parser.error("--tensor-parallel-size needs a MODEL directory (the random demo model is not sharded)")
            factory = functools.partial(_demo_engine, args.dtype, args.device, engine_kwargs)
            tokenizer = build_demo_tokenizer()
        else:
            if tp > 1:  # the engine process is rank 0 and spawns the other ranks
                from ..distributed import start_tensor_parallel_engine

                factory = functools.partial(start_tensor_parallel_engine, model_path, tp,
                                            model_kwargs={"dtype": dtype}, **engine_kwargs)
            else:
                factory = engine_factory(model_path, {"dtype": dtype, "device": args.device}, engine_kwargs)
            try:
                tokenizer = load_tokenizer(True, model_path)
            except (OSError, ValueError, ImportError) as e:
                parser.error(f"{load_error}: {_first_line(e)}")
        where = " (engine process {pid})"
        if tp > 1:
            where = f" (engine process {{pid}}: rank 0 of tensor parallel over {tp} ranks; KV heads split)"
        if args.api_server_count > 1:
            from .api_servers import run_api_servers

            where = where[:-1] + f"; {args.api_server_count} API server processes)"
            describe = functools.partial(_log_engine_process, source, where, bool(args.api_key))
            load = build_demo_tokenizer if model_path is None else functools.partial(load_tokenizer, True, model_path)
            return run_api_servers(args, factory, load, config, daemon=tp == 1, describe=describe)
        try:
            engine = EngineProcessClient(factory, max_waiting=args.max_waiting, tokenizer=tokenizer, daemon=tp == 1)
        except EngineStartError as e:
            parser.error(f"{load_error if model_path else 'cannot build the demo model'}: {_first_line(e)}")
        info = engine.info
        model_class, param_dtype, param_device = info.model_class, info.dtype, info.device
        num_blocks, block_size, pool_bytes = info.num_blocks, info.block_size, info.kv_pool_bytes
        where = where.format(pid=info.pid)
    elif args.tensor_parallel_size > 1:
        from ..distributed import start_tensor_parallel_engine

        tokenizer, engine = _start_scaled_out(
            parser, "--tensor-parallel-size", args.tensor_parallel_size, model_path, load_error,
            "the random demo model is not sharded",
            lambda tok: start_tensor_parallel_engine(model_path, args.tensor_parallel_size, tokenizer=tok,
                                                     model_kwargs={"dtype": dtype}, **engine_kwargs))
        where = f" (tensor parallel over {args.tensor_parallel_size} ranks; KV heads split across them)"
    elif args.data_parallel_size > 1:
        from ..integrations.ray_client import DataParallelClient

        tokenizer, engine = _start_scaled_out(
            parser, "--data-parallel-size", args.data_parallel_size, model_path, load_error,
            "the random demo model is built in-process",
            lambda tok: DataParallelClient(model_path, args.data_parallel_size, max_waiting=args.max_waiting,
                                           engine_kwargs=engine_kwargs,
                                           model_kwargs={"dtype": dtype, "device": args.device}))
        info = engine.router.infos[0]
        model_class, param_dtype, param_device = info["model_class"], info["dtype"], info["device"]
        num_blocks = sum(i["num_blocks"] for i in engine.router.infos)  # all replicas' pools together
        block_size, pool_bytes = engine.block_size, sum(i["kv_pool_bytes"] for i in engine.router.infos)
        where = f" ({args.data_parallel_size} replicas on Ray)"
    else:
        if model_path is None:
            model, tokenizer = _demo_model(args.dtype, args.device)
        else:
            try:
                model, tokenizer = load_model(model_path, dtype=dtype, device=args.device)
            except (OSError, ValueError, ImportError) as e:
                parser.error(f"{load_error}: {_first_line(e)}")
        engine = Engine(model, tokenizer=tokenizer, **engine_kwargs)
        where = ""
    if not args.engine_process and args.data_parallel_size == 1:
        param = next(engine.model.parameters())
        model_class, param_dtype, param_device = type(engine.model).__name__, param.dtype, param.device
        num_blocks, block_size, pool_bytes = engine.kv_pool.num_blocks, engine.block_size, engine.kv_pool.nbytes
    try:
        app = build_app(engine, tokenizer, config)  # resolves config.max_model_len
    except ValueError as e:
        engine.close() if isinstance(engine, Engine) else engine.shutdown()
        parser.error(str(e))
    _log_serving(source, where, bool(args.api_key), config, model_class, param_dtype, param_device, num_blocks,
                 block_size, pool_bytes)
    try:
        return run_app(app, args)
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it handled once it has shut down
        return 1 if app.state.engine_client.error else 0


def _log_serving(source: str, where: str, api_key: bool, config, model_class, dtype, device, num_blocks: int,
                 block_size: int, pool_bytes: int) -> None:
    pool_tokens = num_blocks * block_size
    logger.info("model %s (%s) as %r: dtype %s on %s%s", source, model_class, config.model_name, dtype, device, where)
    logger.info(
        "KV pool: %d blocks of %d tokens (%.1f MiB) = %d tokens, room for %d sequences of max_model_len %d",
        num_blocks, block_size, pool_bytes / 2**20, pool_tokens, pool_tokens // config.max_model_len,
        config.max_model_len,
    )
    if api_key:
        logger.info("API key required on /v1")


def _log_engine_process(source: str, where: str, api_key: bool, client, config) -> None:
    """`_log_serving` for an engine process's client (``where`` has a ``{pid}`` field); picklable for a front end."""
    info = client.info
    _log_serving(source, where.format(pid=info.pid), api_key, config, info.model_class, info.dtype, info.device,
                 info.num_blocks, info.block_size, info.kv_pool_bytes)


def _start_scaled_out(parser, flag: str, size: int, model_path: str | None, load_error: str, demo_reason: str,
                      start):
    """MODEL's tokenizer and ``start(tokenizer)``'s engine, or a parser error naming ``flag``."""
    from ..loader import load_tokenizer

    if model_path is None:
        parser.error(f"{flag} needs a MODEL directory ({demo_reason})")
    try:
        tokenizer = load_tokenizer(True, model_path)
        return tokenizer, start(tokenizer)
    except (OSError, ValueError, ImportError, RuntimeError) as e:
        parser.error(f"{load_error} with {flag} {size}: {_first_line(e)}")


def _demo_model(dtype: str, device: str | None):
    """The tiny random demo model (and tokenizer) in ``dtype`` on ``device``."""
    import torch

    from .demo import build_demo

    model, tokenizer = build_demo()
    if dtype not in ("auto", "float32"):
        model = model.to(getattr(torch, dtype))
    return model.to(resolve_device(device)), tokenizer


def _demo_engine(dtype: str, device: str | None, engine_kwargs: dict):
    """An `Engine` over the tiny random demo model (the ``--engine-process`` factory; picklable by reference)."""
    from ..engine import Engine

    model, tokenizer = _demo_model(dtype, device)
    return Engine(model, tokenizer=tokenizer, **engine_kwargs)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _looks_like_path(model: str) -> bool:
    """A local path rather than a hub id (``org/name`` has one separator at most)."""
    return os.path.isabs(model) or model.startswith((".", "~")) or model.count(os.sep) > 1


def _check_model_argument(parser: argparse.ArgumentParser, model: str) -> None:
    """Fail at once, in one line, for a missing path or a model directory without a tokenizer."""
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        if not any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
            parser.error(
                f"MODEL directory {model!r} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}): "
                f"save one there with tokenizer.save_pretrained(DIR)"
            )
    elif os.path.exists(path):
        parser.error(f"MODEL {model!r} is a file, not a model directory")
    elif _looks_like_path(model):
        parser.error(f"MODEL directory {model!r} does not exist")


def _check_port_free(parser: argparse.ArgumentParser, host: str, port: int) -> None:
    """Bind-test ``host:port`` before the model loads, so a taken port fails in a second, not minutes."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        parser.error(f"--host {host!r}: cannot resolve it ({e.strerror})")
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            s.bind(address)
        except OSError as e:
            reason = "already in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
            parser.error(f"cannot listen on {host}:{port}: {reason}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0.0:
        raise argparse.ArgumentTypeError(f"must be a non-negative number, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
