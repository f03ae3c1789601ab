"""The ``internlm-jax`` command.

``internlm-jax demo`` runs offline on an embedded tiny configuration: it builds a random InternLM2,
saves it as an HF folder, loads it back sharded over (simulated) devices and runs a forward.
``internlm-jax presets`` lists the released architectures. ``internlm-jax convert hf-to-orbax`` /
``orbax-to-hf`` convert checkpoints (see :mod:`conversion.convert`). Errors print one line and exit 1;
``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import math
import os
import sys
import tempfile
import time

DEMO_CONFIG = dict(vocab_size=92544, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                   num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64,
                   rope_theta=1e6, rope_scaling={"type": "dynamic", "factor": 2.0}, bias=False)


def _version() -> str:
    """The installed version, read without importing the package (JAX must not start before --devices)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("internlm-jax")
    except PackageNotFoundError:
        return "(not installed)"


def _dtype_name(name: str) -> str:
    """A dtype flag's value, with the library's short names (bf16, fp32, ...) read as the full ones."""
    from .arrays import SHORT_DTYPE_NAMES

    return SHORT_DTYPE_NAMES.get(name.lower(), name)


def add_mesh_args(parser: argparse.ArgumentParser, tensor: int = 1) -> None:
    g = parser.add_argument_group("mesh (their product must equal the device count; -1 = the rest)")
    g.add_argument("--data", type=int, default=1, help="batch replicas (default 1)")
    g.add_argument("--fsdp", type=int, default=-1, help="batch and parameter shards (default -1: the rest)")
    g.add_argument("--tensor", type=int, default=tensor, help=f"heads / MLP columns (default {tensor})")
    g.add_argument("--sequence", type=int, default=1, help="tokens and KV cache slots: ring attention (default 1)")


def _progress(args) -> bool:
    """Progress bars on long work: on unless --quiet (in a log file too: a long load shows it is alive)."""
    return not args.quiet


def _simulate_devices(n: int | None) -> None:
    """Ask XLA for ``n`` CPU devices; only possible before JAX has started."""
    if n is not None and n < 0:
        raise ValueError(f"--devices must be 0 (the real devices) or a positive number of CPU devices, got {n}")
    if not n:
        return
    if "jax" in sys.modules:
        import jax

        if len(jax.devices()) != n:
            raise RuntimeError("--devices must be set before JAX starts")
        return
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def cmd_demo(args) -> None:
    _simulate_devices(args.devices)
    import jax
    import numpy as np

    from . import InternLM2, InternLM2Config, explain_sharding, make_mesh

    cfg = InternLM2Config(**DEMO_CONFIG)
    mesh = make_mesh(data=args.data, fsdp=args.fsdp, tensor=args.tensor, sequence=args.sequence)
    print(f"devices: {len(jax.devices())} x {jax.devices()[0].platform}; mesh {dict(mesh.shape)}")
    print(f"config: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads / "
          f"{cfg.num_key_value_heads} KV heads, vocab {cfg.vocab_size}, rope {cfg.rope_scaling}; "
          f"{cfg.num_parameters():,} parameters")
    if args.tokenizer:
        from . import Tokenizer

        tok = Tokenizer.from_pretrained(args.tokenizer)
        prompt = "The quick brown fox jumps over the lazy dog." if args.prompt is None else args.prompt
        ids = np.asarray([tok.encode(prompt)])
        print(f"prompt {prompt!r} -> {ids.shape[1]} tokens")
    else:
        if args.prompt is not None:
            raise ValueError("--prompt needs --tokenizer (a tokenizer.model or HF folder) to encode it; without one "
                             "the demo runs random token ids")
        ids = np.random.RandomState(0).randint(3, cfg.vocab_size, (2, 24))
        print(f"no tokenizer given: random token ids {ids.shape}")

    t = time.perf_counter()
    reference_model = InternLM2(cfg, seed=args.seed)
    print(f"random init (1 device): {time.perf_counter() - t:.2f}s")
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        folder = reference_model.save_pretrained(os.path.join(tmp, "tiny-internlm2"), progress=False)
        size = sum(f.stat().st_size for f in folder.iterdir())
        print(f"saved HF folder ({size / 2**20:.1f} MiB): {sorted(p.name for p in folder.iterdir())} "
              f"in {time.perf_counter() - t:.2f}s")
        t = time.perf_counter()
        model = InternLM2.from_pretrained(folder, mesh=mesh, progress=False)
        print(f"loaded back sharded over {mesh.devices.size} devices in {time.perf_counter() - t:.2f}s")
    for name, spec in explain_sharding(model).items():
        print(f"  {name:32s} {spec}")
    t = time.perf_counter()
    logits, hidden = model(ids, output_hidden_states=True)
    logits.block_until_ready()
    print(f"forward (compile + run): {time.perf_counter() - t:.2f}s; logits {logits.shape} {logits.dtype}, "
          f"hidden states {hidden.shape}, logits sharded as {logits.sharding.spec}")
    diff = float(np.abs(np.asarray(logits) - np.asarray(reference_model(ids))).max())
    print(f"max |sharded - single-device| logit difference: {diff:.2e}")
    print(f"greedy next token per sequence: {np.asarray(logits[:, -1].argmax(-1)).tolist()}")
    if diff > 1e-4:
        raise RuntimeError(f"sharded and single-device logits differ by {diff}")


def _load_for_generation(args):
    _start_distributed(args)
    if hasattr(args, "temperature"):  # generate and chat: their sampling flags, before the model loads
        _check_sampling(args)
    from . import InternLM2, InternLM2Config, Tokenizer, make_mesh
    from .multihost import check_same, rendezvous

    def named(e: Exception, message: str) -> Exception:  # as the base class: a subclass may take other arguments
        return (OSError if isinstance(e, OSError) else ValueError)(message)

    try:  # the folder first: a preset name, a wrong path or a weights file is named as --model
        config = InternLM2Config.from_pretrained(args.model)
    except (OSError, ValueError) as e:
        raise named(e, f"--model: {e}") from None
    try:  # a missing tokenizer is named before the weights load
        tok = Tokenizer.from_pretrained(args.tokenizer or args.model)
    except (OSError, ValueError) as e:
        raise named(e, f"--tokenizer: {e}" if args.tokenizer else f"--model: {e} (or pass --tokenizer)") from None
    mesh = make_mesh(data=args.data, fsdp=args.fsdp, tensor=args.tensor, sequence=args.sequence)
    rendezvous("model's load", getattr(args, "init_timeout", 300))  # many hosts: a bad path or flag on any ends all
    same = {f"--{axis}": size for axis, size in mesh.shape.items()}  # else the programs differ, and hang
    same.update({"--dtype": str(args.dtype), "the model's config": repr(config)})
    if getattr(args, "prompt", None) is not None:  # generate --prompt: every process runs the whole generation
        same["--prompt"] = args.prompt
        for name, value in _sampling_kwargs(args).items():
            same[f"--{name.replace('_', '-')}"] = repr(value) if isinstance(value, (list, tuple)) else value
    check_same(same, "flags")
    model = InternLM2.from_pretrained(args.model, mesh=mesh, dtype=args.dtype, progress=_progress(args))
    return model, tok


def _check_sampling(args) -> None:
    """The sampling flags, checked before the model loads (minutes for a large one)."""
    from .generation import SamplingParams

    SamplingParams(args.temperature, args.top_k, args.top_p, args.repetition_penalty, args.presence_penalty,
                   args.frequency_penalty)
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be a positive integer, got {args.max_new_tokens}")


def _sampling_kwargs(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, stop=args.stop, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                frequency_penalty=args.frequency_penalty, seed=args.seed, truncate=args.truncate)


def _check_sizes(args, *names: str) -> None:
    """Engine size flags (--max-batch, --max-len, ...) as positive integers, before the model loads."""
    for name in names:
        value = getattr(args, name.replace("-", "_"))
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be a positive integer, got {value}")


def cmd_generate(args) -> None:
    if args.prompt is not None and args.input is not None:
        raise ValueError("give --prompt or --input (a JSONL file of requests), not both")
    if args.prompt is None and args.input is None:
        raise ValueError("give --prompt or --input (a JSONL file of requests)")
    if args.input is not None and args.output is None:
        raise ValueError("--input needs --output (the JSONL file results are appended to)")
    if args.prompt is not None:
        given = [f for f, v in (("--output", args.output), ("--max-len", args.max_len),
                                ("--max-batch", args.max_batch)) if v is not None]
        if given:
            raise ValueError(f"{given[0]} goes with --input (a JSONL file of requests), not --prompt")
    _check_sizes(args, "max-batch", "max-len")
    # the files and every line's syntax, before minutes of loading (one process; in a multi-host job only
    # process 0 reads --input, and run_batch checks it there, where a failure reaches the other processes)
    if args.input is not None and not args.coordinator and not args.distributed:
        from pathlib import Path

        from .batch import check_output, input_lines

        check_output(Path(args.output), args.input)
        for _ in input_lines(args.input):
            pass
    model, tok = _load_for_generation(args)  # first: it may set up simulated devices before JAX starts
    from .generation import default_stop_ids, generate, stream

    if args.input is not None:
        import jax

        from .batch import run_batch
        from .engine import Engine, serving_length

        engine = Engine(model, max_batch=args.max_batch or 8, max_len=args.max_len or serving_length(model),
                        stop_ids=default_stop_ids(model.config, tok))
        from .multihost import PeerFailed, finish

        if jax.process_index() != 0:  # process 0 decides the steps and writes the file; the others follow
            failed = engine.follow()  # (only process 0 reads --input: hosts need not share a file system)
            finish()
            if failed:
                raise PeerFailed(f"process 0 failed: {failed}")
            return
        defaults = dict(max_tokens=args.max_new_tokens, stop=args.stop, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                        seed=args.seed)
        error = None
        try:
            result = run_batch(engine, tok, args.input, args.output, defaults=defaults, progress=_progress(args))
        except KeyboardInterrupt:
            error = "interrupted (Ctrl-C)"
            raise
        except Exception as e:
            error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            raise
        finally:
            engine.close(error)
            finish()
        print(f"{result['requests']} requests ({result['skipped']} already done), {result['tokens']} tokens in "
              f"{result['seconds']:.1f} s ({result['tokens_per_s']:.1f} tokens/s) -> {args.output}", file=sys.stderr)
        return

    import jax

    leader = jax.process_index() == 0  # many hosts: every process runs the same steps, process 0 prints
    if args.no_stream:
        text = generate(model, tok, args.prompt, **_sampling_kwargs(args))
        print(text) if leader else None
        return
    from .interrupts import CaughtInterrupt

    with CaughtInterrupt() as ctrl_c:  # a Ctrl-C lost in a garbage-collector callback ends it at the next token
        for piece in stream(model, tok, args.prompt, **_sampling_kwargs(args)):
            ctrl_c.check()
            print(piece, end="", flush=True) if leader else None
    print() if leader else None


def cmd_serve(args) -> None:
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be from 0 to 65535, got {args.port}")
    _check_sizes(args, "max-batch", "max-len", "max-queue", "prefill-chunk")
    if not (getattr(args, "coordinator", None) or getattr(args, "distributed", False)):
        import socket  # one process: a port in use or a bad --host is named now, not after the load

        try:
            with socket.create_server((args.host, args.port)):
                pass
        except OSError as e:
            raise OSError(f"--host {args.host} --port {args.port}: cannot listen there ({e.strerror or e})") from None
    model, tok = _load_for_generation(args)
    from .server import serve

    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    serve(model, tok, model_name=name, host=args.host, port=args.port, max_batch=args.max_batch,
          max_len=args.max_len, max_queue=args.max_queue,
          prefill_chunk=args.prefill_chunk, log_level="warning" if args.quiet else "info")


def cmd_chat(args) -> None:
    model, tok = _load_for_generation(args)
    from .generation import chat

    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("user> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("exit", "quit"):
            break
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        print("assistant> " if interactive else "", end="", flush=True)
        try:
            reply = chat(model, tok, messages, stream_to=lambda p: print(p, end="", flush=True),
                         **_sampling_kwargs(args))
        except ValueError as e:  # this turn cannot run (the conversation outgrew the context, bad text):
            messages.pop()  # say so and keep the session
            print(f"\nerror: {str(e).splitlines()[0]}" + (" (the conversation is longer than the context: "
                  "start a new session, or pass --truncate to keep its end)" if "exceeds max_length" in str(e)
                  else ""), file=sys.stderr, flush=True)
            continue
        print()
        messages.append(reply)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF or Orbax checkpoint folder")
    p.add_argument("--tokenizer", help="tokenizer.model or folder (default: the model folder)")
    p.add_argument("--dtype", default=None,
                   help="float32, bfloat16 or float16 (default: float32 for HF, saved for Orbax)")
    p.add_argument("--devices", type=int, default=0, help="simulate N CPU devices (0 = use what is there)")
    p.add_argument("--quiet", action="store_true", help="no loading progress bar")
    add_mesh_args(p)


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    """The model flags and the sampling flags (serve takes the model flags only: each request brings its
    own sampling parameters, with OpenAI's defaults)."""
    _add_model_args(p)
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default: 128 (chat: 512), or as many as fit in the context")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="end the reply before this text (repeatable; generate --input: per line, 'stop')")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (default 0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1: off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="HF's, > 1 penalises seen tokens "
                                                                         "(default 1: off)")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI's, -2 to 2 (default 0: off)")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI's, -2 to 2 (default 0: off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--truncate", action="store_true", help="keep the end of a prompt that is too long")


def _start_distributed(args, preemption: bool = False) -> None:
    """``--coordinator`` / ``--distributed``: join a multi-process job (after ``--devices``); ``preemption``:
    see :func:`~internlm_jax.multihost.initialize`."""
    _simulate_devices(args.devices)
    coordinator, environment = getattr(args, "coordinator", None), getattr(args, "distributed", False)
    processes, process_id = getattr(args, "num_processes", 1), getattr(args, "process_id", 0)
    if not coordinator and (processes != 1 or process_id != 0):  # else each ran the job alone
        raise ValueError("--num-processes and --process-id go with --coordinator HOST:PORT (with --distributed "
                         "the cluster environment gives them)")
    if coordinator and not 0 <= process_id < processes:
        raise ValueError(f"--process-id must be from 0 to {processes - 1} (--num-processes {processes}), got "
                         f"{process_id}")
    if coordinator and process_id == 0:  # process 0 serves the coordinator: its port must be free
        from .multihost import check_port_free

        check_port_free(coordinator)
    if coordinator or environment:
        from .multihost import initialize

        initialize(coordinator, processes, process_id, from_environment=environment,
                   timeout_s=getattr(args, "init_timeout", 300), preemption=preemption)


def add_distributed_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("many hosts (run the same command on every host)")
    g.add_argument("--distributed", action="store_true",
                   help="jax.distributed.initialize() from the cluster environment")
    g.add_argument("--coordinator", help="host:port of process 0, for an explicit multi-process run")
    g.add_argument("--num-processes", type=int, default=1, help="with --coordinator: processes in the job")
    g.add_argument("--process-id", type=int, default=0, help="with --coordinator: this process (0 = the leader)")
    g.add_argument("--init-timeout", type=int, default=300, metavar="SECONDS",
                   help="how long to wait for every process to join (default 300)")


def cmd_train(args) -> None:
    _start_distributed(args, preemption=True)
    from .training import TrainConfig, train

    cfg = TrainConfig.from_yaml(args.config)
    if args.steps is not None:
        if args.steps < 1:
            raise ValueError(f"--steps: must be at least 1 (got {args.steps})")
        cfg.steps = args.steps
    train(cfg)


def _chunk_bytes(mb: float) -> int:
    if not math.isfinite(mb) or mb <= 0:
        raise ValueError(f"--chunk-mb must be a positive number, got {mb}")
    return max(1, int(mb * (1 << 20)))


def cmd_data_tokenize(args) -> None:
    from .training.tokenize import tokenize_corpus

    t = time.perf_counter()
    index = tokenize_corpus(args.tokenizer, args.input, args.output, fmt=args.format, text_key=args.text_key,
                            workers=args.workers, chunk_bytes=_chunk_bytes(args.chunk_mb),
                            overwrite=args.overwrite, progress=None if not args.quiet else False)
    if not args.quiet:
        seconds = time.perf_counter() - t
        print(f"wrote {args.output}: {index['tokens']:,} tokens, {index['documents']:,} documents in "
              f"{len(index['shards'])} shard(s), {seconds:.1f}s ({index['tokens'] / seconds:,.0f} tokens/s)")


def cmd_presets(args) -> None:
    from .config import InternLM2Config

    for name in InternLM2Config.preset_names():
        c = InternLM2Config.preset(name)
        print(f"{name:26s} {c.num_parameters() / 1e9:6.2f}B  layers={c.num_hidden_layers:2d} hidden={c.hidden_size} "
              f"heads={c.num_attention_heads}/{c.num_key_value_heads} max_pos={c.max_position_embeddings} "
              f"theta={c.rope_theta:g} rope_scaling={c.rope_scaling}")


def _library_noise(exc: BaseException | None, tb) -> bool:
    """A report Orbax/tensorstore make again of a failure our one-line error already names: their
    background threads and coroutines fail with ``Event loop is closed`` once the read was abandoned."""
    if isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc):
        return True
    import traceback

    return any(part in frame.filename for frame in traceback.extract_tb(tb)
               for part in ("/orbax/", "/tensorstore/", "/asyncio/"))


def _silence_libraries():
    """Keep the libraries' own reports of a failure off stderr (absl's log lines, asyncio's "exception
    was never retrieved" for the reads tensorstore abandoned, and the noise above from threads and
    unraisable coroutines, also at exit); anything else still reaches the previous hooks. Returns a
    function that puts the hooks and log levels back."""
    import logging
    import threading

    unraisable, thread_hook, hook = sys.unraisablehook, threading.excepthook, sys.excepthook
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
    levels = [logger.level for logger in loggers]
    sys.unraisablehook = lambda u: None if _library_noise(u.exc_value, u.exc_traceback) else unraisable(u)
    threading.excepthook = lambda a: None if _library_noise(a.exc_value, a.exc_traceback) else thread_hook(a)
    # tensorstore's C++ threads call back into a closed event loop and print the error via sys.excepthook
    sys.excepthook = lambda t, v, tb: None if _library_noise(v, tb) else hook(t, v, tb)
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)

    def restore() -> None:
        sys.unraisablehook, threading.excepthook, sys.excepthook = unraisable, thread_hook, hook
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)

    return restore


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would be so that the same clean-up runs."""


@contextlib.contextmanager
def _conversion_run(quiet: bool):
    """While a conversion runs: SIGTERM cleans up the temporary output as Ctrl-C does, and when
    ``quiet`` (no --debug) the libraries' own reports stay off stderr. Restored afterwards, except the
    silencing after a failure: the libraries' threads may report it again at any moment until the exit."""
    import signal

    def interrupt(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, interrupt)
    restore = _silence_libraries() if quiet else None
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)  # None: set outside Python
    if restore is not None:  # (reached only when the conversion succeeded)
        restore()


_SILENCED_AT_EXIT = []


def cmd_convert(args) -> None:
    from conversion.convert import hf_to_orbax, orbax_to_hf, train_to_hf

    t = time.perf_counter()
    progress = _progress(args)
    with _conversion_run(quiet=not args.debug):
        if args.direction == "hf-to-orbax":
            out = hf_to_orbax(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite, progress=progress)
        elif args.direction == "train-to-hf":
            out = train_to_hf(args.src, args.dst, step=args.step, dtype=args.dtype, shard_size=args.shard_size,
                              overwrite=args.overwrite, progress=progress)
        else:
            out = orbax_to_hf(args.src, args.dst, dtype=args.dtype, shard_size=args.shard_size,
                              overwrite=args.overwrite, progress=progress)
    if not args.quiet:
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        print(f"wrote {out} ({size / 1e9:.2f} GB) in {time.perf_counter() - t:.1f}s")


def cmd_plan(args) -> None:
    if args.topology is None:
        _simulate_devices(args.devices)
    else:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only TPU devices; nothing runs here
    import json

    from .plan import PROGRAMS, plan

    dtype = _dtype_name(args.dtype)  # (after the devices are set up: it imports JAX)
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype must be float32, bfloat16 or float16, got {args.dtype!r}")
    unknown = [p for p in args.programs.split(",") if p not in PROGRAMS]
    if unknown:
        raise ValueError(f"--programs: unknown program {unknown[0]!r}; use some of {', '.join(PROGRAMS)}")
    _check_sizes(args, "batch", "max-new-tokens", "context", "max-tries")
    sizes = {k: getattr(args, k) for k in ("data", "fsdp", "tensor", "sequence") if getattr(args, k) is not None}
    if sizes:
        sizes.setdefault("fsdp", -1)
    say = None if args.json else (lambda m: print(m, file=sys.stderr, flush=True))
    result = plan(args.model, args.topology, context=args.context, batch=args.batch, mesh=sizes or None,
                  max_new_tokens=args.max_new_tokens, dtype=dtype, programs=args.programs.split(","),
                  remat=args.remat, attention_impl=args.attention, decode_impl=args.decode,
                  suggest=not args.no_suggest,
                  max_tries=args.max_tries, progress=say)
    if args.json:
        print(json.dumps(result.to_dict(), indent=1))
    else:
        print(result.table())


def _shard_size(text: str) -> int:
    """--shard-size, checked while parsing so a bad one fails before any work."""
    from .hf_checkpoint import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    # --debug before or after the subcommand: the top level owns the flag (default False); the
    # subcommands' copy leaves it unset unless given (an action shared through parents=[...] would
    # carry the top level's default into every subcommand and reset a --debug given first)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
    p = argparse.ArgumentParser(prog="internlm-jax", description="InternLM2 / InternLM2.5 in JAX: demo, generate, "
                                "chat, serve, convert, plan, train, data tokenize. Errors print one line "
                                "(--debug: the traceback).")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    p.add_argument("--version", action="version", version=f"internlm-jax {_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    convert = sub.add_parser("convert", help="HF checkpoint folders <-> Orbax checkpoints (streaming)")
    csub = convert.add_subparsers(dest="direction", required=True)
    for direction, text in (("hf-to-orbax", "an HF folder (safetensors or pytorch_model*.bin) -> Orbax"),
                            ("orbax-to-hf", "an Orbax checkpoint -> an HF folder the official code loads"),
                            ("train-to-hf", "a training run's checkpoint folder -> an HF folder")):
        c = csub.add_parser(direction, help=text, parents=[common])
        source, target = direction.split("-to-")
        c.add_argument("src", help={"hf": "the HF folder to read (config.json and the weights)",
                                    "orbax": "the Orbax checkpoint folder to read",
                                    "train": "the training run's checkpoint folder"}[source])
        c.add_argument("dst", help=f"the {'Orbax checkpoint' if target == 'orbax' else 'HF'} folder to write; "
                                   "it may not be or contain SRC")
        c.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], type=_dtype_name,
                       help="convert the weights on the way (default: keep the source dtype; required "
                            "when the source mixes dtypes)")
        c.add_argument("--overwrite", action="store_true",
                       help="replace DST if it exists (only a checkpoint folder: one with a weights file or "
                            "internlm_jax_checkpoint.json)")
        c.add_argument("--quiet", action="store_true", help="no progress bar or summary")
        if direction != "hf-to-orbax":
            c.add_argument("--shard-size", default="5GB", type=_shard_size,
                           help="largest safetensors file: 5GB, 500MB, 2GiB or bytes (default 5GB)")
        if direction == "train-to-hf":
            c.add_argument("--step", type=int, help="which saved step (default: the latest)")
        c.set_defaults(func=cmd_convert)
    demo = sub.add_parser("demo", help="offline demo on a tiny random model (no download)", parents=[common])
    demo.add_argument("--devices", type=int, default=8, help="simulated CPU devices (default 8; 0 = as found)")
    demo.add_argument("--tokenizer", help="a tokenizer.model (or HF folder) to encode --prompt with")
    demo.add_argument("--prompt", help="text run through the model, with --tokenizer (default: a pangram; "
                                       "without a tokenizer, random token ids)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    add_mesh_args(demo, tensor=2)
    demo.set_defaults(func=cmd_demo)
    gen = sub.add_parser("generate", help="generate text from a prompt (streamed), or a JSONL file of requests "
                         "(continuous batching, resumable)", parents=[common])
    _add_generation_args(gen)
    gen.add_argument("--prompt", help="the text to continue (or --input for a JSONL file of requests)")
    gen.add_argument("--no-stream", action="store_true", help="print the whole text at the end")
    gen.add_argument("--input", help="JSONL, one request per line: {\"id\", \"prompt\" | \"messages\" | "
                     "\"prompt_ids\", optional max_tokens, temperature, ...}")
    gen.add_argument("--output", help="JSONL results, appended; a rerun skips ids already there")
    gen.add_argument("--max-batch", type=int, help="with --input: sequences decoded together (default 8)")
    gen.add_argument("--max-len", type=int, default=None, help="with --input: prompt + output tokens per "
                     "request (default: the model's context, at most 4096)")
    add_distributed_args(gen)
    gen.set_defaults(func=cmd_generate)
    srv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (continuous batching)", parents=[common])
    _add_model_args(srv)
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8000, help="default 8000")
    srv.add_argument("--max-batch", type=int, default=8, help="cache rows: requests decoded together (default 8)")
    srv.add_argument("--max-len", type=int, default=None,
                     help="prompt + output tokens per request (default: the model's context, at most 4096)")
    srv.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429 (default 256)")
    srv.add_argument("--prefill-chunk", type=int, default=512,
                     help="prompt tokens prefilled between two decode chunks (default 512; rounded down to a "
                          "power of two)")
    srv.add_argument("--served-model-name", help="the model id clients send (default: the folder name)")
    add_distributed_args(srv)
    srv.set_defaults(func=cmd_serve)
    chat = sub.add_parser("chat", help="interactive chat (one user turn per line on stdin; a line 'exit' or 'quit' "
                                       "ends it)", parents=[common])
    _add_generation_args(chat)
    chat.add_argument("--system", help="a system message")
    chat.set_defaults(func=cmd_chat)
    tr = sub.add_parser("train", help="continued pretraining from a YAML config (resumes automatically)",
                        parents=[common])
    tr.add_argument("--config", required=True, help="the run's YAML file (see examples/train_tiny.yaml)")
    tr.add_argument("--steps", type=int, help="override the number of steps")
    tr.add_argument("--devices", type=int, default=0, help="simulate N CPU devices (0 = use what is there)")
    add_distributed_args(tr)
    tr.set_defaults(func=cmd_train)
    data = sub.add_parser("data", help="prepare training data")
    dsub = data.add_subparsers(dest="direction", required=True, metavar="tokenize")
    tk = dsub.add_parser("tokenize", parents=[common],
                         help="text / chat JSONL of any size -> sharded token files for `train` (resumable)")
    tk.add_argument("--tokenizer", required=True, help="a tokenizer.model, or a checkpoint folder holding one")
    tk.add_argument("--input", required=True, nargs="+", help="files or quoted glob patterns ('corpus/*.jsonl')")
    tk.add_argument("--output", required=True, help="the folder to write (set data.train to it)")
    tk.add_argument("--format", default="text", choices=["text", "chat"],
                    help="text: .txt lines or .jsonl text_key; chat: .jsonl messages for SFT (default text)")
    tk.add_argument("--text-key", default="text", help="the .jsonl field holding the text (default text)")
    tk.add_argument("--workers", type=int, default=1, help="tokenizing processes (default 1)")
    tk.add_argument("--chunk-mb", type=float, default=32, help="MB of input per shard (default 32)")
    tk.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    tk.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    tk.set_defaults(func=cmd_data_tokenize)
    pl = sub.add_parser("plan", help="compile prefill/decode/train for a TPU slice: memory, fit, roofline",
                        parents=[common])
    pl.add_argument("--model", required=True, help="a preset (see `presets`) or a checkpoint folder")
    pl.add_argument("--topology", help="a TPU slice, e.g. v5e:4x4, v5p:2x2x4, v6e-8 (needs jax[tpu]); "
                                       "default: the local devices")
    pl.add_argument("--context", type=int, help="prompt tokens (and training sequence length); "
                                                "default: the model's max_position_embeddings")
    pl.add_argument("--batch", type=int, default=1, help="sequences (default 1)")
    pl.add_argument("--max-new-tokens", type=int, default=256, help="decode room in the KV cache (default 256)")
    pl.add_argument("--dtype", default="bfloat16", help="compute / cache dtype: float32, bfloat16 (bf16) or "
                                                        "float16 (default bfloat16)")
    pl.add_argument("--programs", default="prefill,decode_step,decode_loop,train_step",
                    help="comma-separated subset of prefill, decode_step, decode_loop, train_step (default: all)")
    pl.add_argument("--remat", default="full", choices=["none", "full", "dots", "dots_no_batch"],
                    help="activation checkpointing of the train step (default full)")
    pl.add_argument("--attention", choices=["blockwise", "splash", "xla", "cudnn"],
                    help="attention inside ring steps (default: the model's, blockwise)")
    pl.add_argument("--decode", choices=["dense", "ragged"],
                    help="decode-step attention: ragged = the Pallas TPU kernel (default: the model's "
                         "setting, which picks ragged on TPU where the shapes allow, else dense)")
    pl.add_argument("--no-suggest", action="store_true", help="do not search for a mesh that fits")
    pl.add_argument("--max-tries", type=int, default=6, help="most candidate meshes compiled (default 6)")
    pl.add_argument("--devices", type=int, default=0, help="without --topology: simulate N CPU devices")
    pl.add_argument("--json", action="store_true", help="machine-readable output")
    g = pl.add_argument_group("mesh (default: tensor over the KV heads, the rest fsdp)")
    for axis in ("data", "fsdp", "tensor", "sequence"):
        g.add_argument(f"--{axis}", type=int)
    pl.set_defaults(func=cmd_plan)
    presets = sub.add_parser("presets", help="list the released architectures", parents=[common])
    presets.set_defaults(func=cmd_presets)
    return p


def _in_multihost_job() -> bool:
    """Whether this process has joined a multi-host job (asked without starting a backend:
    ``process_count`` would claim a TPU to answer)."""
    jax = sys.modules.get("jax")
    return jax is not None and jax.distributed.is_initialized()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except Terminated:  # SIGTERM during a conversion: cleaned up as for Ctrl-C, the shell's code for SIGTERM
        print("terminated", file=sys.stderr, flush=True)
        return 128 + 15
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        if _in_multihost_job():  # the others may be inside a collective with this process: leaving together
            from .multihost import leave_now  # would hang; they end too, naming this process

            leave_now("interrupted (Ctrl-C)", 130)
        return 130
    except BrokenPipeError:  # e.g. piped into `head`
        return 0
    except Exception as e:  # one line for users; the traceback with --debug
        if args.debug:
            raise
        what = " ".join(x for x in (args.command, getattr(args, "direction", None)) if x)
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"internlm-jax {what}: error: {message}", file=sys.stderr, flush=True)
        if not _SILENCED_AT_EXIT:  # they may report the failure again while the interpreter exits
            _SILENCED_AT_EXIT.append(atexit.register(_silence_libraries))
        if _in_multihost_job():  # the usual exit would wait on processes that may be gone (shutdown hangs)
            from .multihost import PeerFailed, leave_after_error

            leave_after_error(None if isinstance(e, PeerFailed) else message, f"internlm-jax {what}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
