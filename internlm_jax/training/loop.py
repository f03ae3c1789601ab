"""The training loop: model and data set-up, sharded jitted steps, Orbax checkpoints, metrics, eval."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from ..config import InternLM2Config
from ..model import InternLM2
from ..sharding import make_mesh, named_sharding
from .config import TrainConfig
from .data import Batch, PackedDataset
from .step import init_optimizer_state, make_eval_step, make_optimizer, make_train_step


def build_model(cfg: TrainConfig, mesh) -> InternLM2:
    m = cfg.model
    if m.checkpoint:
        model = InternLM2.from_pretrained(m.checkpoint, mesh=mesh, dtype=m.dtype, param_dtype=m.param_dtype)
    else:
        arch = InternLM2Config.preset(m.preset).replace(**m.overrides)
        model = InternLM2(arch, mesh=mesh, dtype=m.dtype, param_dtype=m.param_dtype, seed=cfg.seed)
    model.configure(remat=m.remat)
    return model


def measure_peak_flops(n: int = 1024, repeats: int = 5, dtype=jnp.float32) -> float:
    """Matmul FLOP/s of one device in ``dtype``, measured now (for the MFU estimate when no peak is
    configured)."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


class Metrics:
    """stdout, JSONL and (when installed) TensorBoard, from process 0."""

    def __init__(self, cfg: TrainConfig):
        self.main = jax.process_index() == 0
        self.jsonl = Path(cfg.log.jsonl) if cfg.log.jsonl and self.main else None
        if self.jsonl:
            self.jsonl.parent.mkdir(parents=True, exist_ok=True)
        self.tb = None
        if cfg.log.tensorboard and self.main:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    SummaryWriter = None
                    print("tensorboard logging skipped: install tensorboardX", file=sys.stderr)
            if SummaryWriter is not None:
                self.tb = SummaryWriter(cfg.log.tensorboard)

    def write(self, record: dict) -> None:
        if not self.main:
            return
        step = record["step"]
        print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()), flush=True)
        if self.jsonl:
            with open(self.jsonl, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.tb:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def close(self):
        if self.tb:
            self.tb.close()


def _global_batch(batch: Batch, mesh, global_rows: int) -> dict:
    out = {}
    for name in ("inputs", "targets", "segment_ids", "loss_mask", "weight"):
        local = getattr(batch, name)
        shape = (global_rows,) + local.shape[1:]
        sharding = named_sharding(("batch", "seq"), shape, mesh)
        out[name] = jax.make_array_from_process_local_data(sharding, local, shape)
    return out


def _rows(batch: Batch, proc: int, nproc: int) -> Batch:
    """This process's share of a batch that every process built whole."""
    n = batch.inputs.shape[0]
    sl = slice(proc * n // nproc, (proc + 1) * n // nproc)
    return Batch(*(getattr(batch, f)[sl] for f in ("inputs", "targets", "segment_ids", "loss_mask", "weight")))


def _checkpoint_manager(cfg: TrainConfig):
    if not cfg.checkpoint.dir:
        return None
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=cfg.checkpoint.keep, save_interval_steps=cfg.checkpoint.every,
                                           enable_async_checkpointing=cfg.checkpoint.async_save)
    return ocp.CheckpointManager(Path(cfg.checkpoint.dir).absolute(), options=options)


def _save(mgr, step: int, params, opt_state, loader, force: bool = False):
    import grain
    import orbax.checkpoint as ocp

    leaves = {f"{i:05d}": x for i, x in enumerate(jax.tree.leaves(opt_state))}
    mgr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params.to_pure_dict()),
                                           opt_state=ocp.args.StandardSave(leaves),
                                           data=grain.checkpoint.CheckpointSave(loader)), force=force)


def _restore(mgr, step: int, params, opt_state, loader):
    """Parameters, optimizer state and, in place, the data loader's position."""
    import grain
    import orbax.checkpoint as ocp

    abstract = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)  # noqa: E731
    leaves, treedef = jax.tree.flatten(opt_state)
    target = ocp.args.Composite(
        params=ocp.args.StandardRestore(jax.tree.map(abstract, params.to_pure_dict())),
        opt_state=ocp.args.StandardRestore({f"{i:05d}": abstract(x) for i, x in enumerate(leaves)}))
    restored = mgr.restore(step, args=target)
    nnx.replace_by_pure_dict(params, restored["params"])
    opt_state = jax.tree.unflatten(treedef, [restored["opt_state"][f"{i:05d}"] for i in range(len(leaves))])
    try:
        mgr.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(loader)))
    except (ValueError, KeyError, FileNotFoundError) as e:  # an older checkpoint, or another process count
        loader.set_state({"next_index": step})  # batch t is a pure function of t: the same position
        print(f"data loader state not in the checkpoint ({str(e).splitlines()[0]}); continuing at step {step}",
              file=sys.stderr)
    if loader.get_state().get("next_index") != step:
        raise ValueError(f"{mgr.directory}: checkpoint {step} holds the data loader at batch "
                         f"{loader.get_state().get('next_index')}, not {step}")
    return params, opt_state


def load_tokenizer(cfg: TrainConfig):
    """The configured tokenizer; ``tokenizer: demo`` trains a small SentencePiece model on the training
    text files (offline examples; a real checkpoint brings its own tokenizer.model) and keeps it beside
    the checkpoints, so a resumed run tokenizes the same way."""
    from ..tokenizer import Tokenizer

    if not cfg.tokenizer:
        return None
    if cfg.tokenizer != "demo":
        return Tokenizer.from_pretrained(cfg.tokenizer)
    path = Path(cfg.checkpoint.dir).parent / "demo_tokenizer.model"
    if path.is_file():
        return Tokenizer(path)
    texts = []
    for file in cfg.data.train:
        if not file.endswith(".txt"):
            raise ValueError(f"tokenizer: demo trains on plain .txt files; {file} is not one (set a real tokenizer)")
        texts += Path(file).read_text(encoding="utf-8").splitlines()
    print(f"tokenizer: demo: trained a small SentencePiece model on the training text -> {path}", file=sys.stderr)
    return Tokenizer.train(texts, path)


def train(cfg: TrainConfig) -> list[dict]:
    """Run (or resume) training as configured; returns the metric records of this process."""
    cfg.validate()
    mesh = make_mesh(**cfg.mesh.model_dump())
    tok = load_tokenizer(cfg)
    d = cfg.data
    data = PackedDataset(d.train, tok, d.seq_len, text_key=d.text_key, seed=cfg.seed, fmt=d.format,
                         bin_dtype=d.bin_dtype)
    eval_data = PackedDataset([d.eval], tok, d.seq_len, text_key=d.text_key, fmt=d.format,
                              bin_dtype=d.bin_dtype) if d.eval else None
    proc, nproc = jax.process_index(), jax.process_count()
    loader = iter(data.loader(d.batch_size, cfg.steps, proc, nproc, threads=d.loader_threads, prefetch=d.prefetch))
    model = build_model(cfg, mesh)
    graphdef, params = nnx.split(model)
    tx, schedule = make_optimizer(cfg.optim, cfg.steps)
    opt_state = init_optimizer_state(tx, params, mesh)
    step_fn = jax.jit(make_train_step(graphdef, tx, grad_accum=cfg.optim.grad_accum, segments=d.segment_masking,
                                      z_loss=cfg.optim.z_loss, schedule=schedule, loss_chunk=cfg.model.loss_chunk),
                      donate_argnums=(0, 1))
    eval_fn = jax.jit(make_eval_step(graphdef, segments=d.segment_masking, loss_chunk=cfg.model.loss_chunk))
    mgr = _checkpoint_manager(cfg)
    if mgr is not None and jax.process_index() == 0:
        model.config.save(cfg.checkpoint.dir)  # so `internlm-jax convert train-to-hf` knows the architecture
    start = 0
    if mgr is not None and mgr.latest_step() is not None:
        start = mgr.latest_step()
        params, opt_state = _restore(mgr, start, params, opt_state, loader)
        print(f"resumed from {cfg.checkpoint.dir} at step {start}", flush=True)
    metrics = Metrics(cfg)
    flops_per_token = model.config.train_flops_per_token(d.seq_len)
    peak = (cfg.log.peak_tflops * 1e12 if cfg.log.peak_tflops else measure_peak_flops()) * jax.device_count()
    history = []
    t_last = time.perf_counter()
    for step in range(start, cfg.steps):
        batch = _global_batch(next(loader), mesh, d.batch_size)
        params, opt_state, m = step_fn(params, opt_state, batch, step)
        done = step + 1
        if done % cfg.log.every == 0 or done == cfg.steps:
            m = jax.device_get(m)
            now = time.perf_counter()
            tokens_per_s = cfg.log.every * d.batch_size * d.seq_len / (now - t_last)
            t_last = now
            record = {"step": done, "loss": float(m["loss"]), "ce": float(m["ce"]), "lr": float(m["lr"]),
                      "grad_norm": float(m["grad_norm"]), "tokens_per_s": tokens_per_s,
                      "mfu": tokens_per_s * flops_per_token / peak}
            if eval_data is not None and cfg.eval_every and done % cfg.eval_every == 0:
                sums = [jax.device_get(eval_fn(params, _global_batch(_rows(b, proc, nproc), mesh, d.batch_size)))
                        for b in eval_data.eval_batches(d.batch_size)]
                total, count = (sum(float(x[i]) for x in sums) for i in (0, 1))
                record["eval_ppl"] = math.exp(total / count) if count else float("nan")
            metrics.write(record)
            history.append(record)
        if mgr is not None:
            _save(mgr, done, params, opt_state, loader, force=done == cfg.steps)
    if mgr is not None:
        mgr.wait_until_finished()
        mgr.close()
    metrics.close()
    nnx.update(model, params)
    if cfg.export_hf and proc == 0:
        model.save_pretrained(cfg.export_hf, overwrite=True, dtype=cfg.model.param_dtype)
    return history
