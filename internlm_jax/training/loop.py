"""The training loop: model and data set-up, sharded jitted steps, Orbax checkpoints, metrics, eval.

A checkpoint folder is resumed automatically. It holds ``config.json`` (the architecture, for
``internlm-jax convert train-to-hf``) and ``run_settings.json`` (:func:`run_settings`: what a resumed run
must share with the checkpoints); both are written at the first start and after each successful
restore, never before. ``steps`` may change on resume, to continue a run for longer: the run then goes on
as one started with the new ``steps`` would (its learning-rate schedule is that run's, as HF Trainer
does it, so a longer cosine puts the lr back up at the resume step; the change is announced with both
values). ``steps`` below the checkpoint's step is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from pathlib import Path

import jax
from flax import nnx

from ..checkpoint import CHECKPOINT_MARKERS
from ..files import absolute, atomic_write, check_destination
from ..interrupts import HeldInterrupt
from ..model import InternLM2
from ..multihost import check_same, rendezvous
from ..sharding import make_mesh, named_sharding
from .config import Overrides, TrainConfig
from .corpus import check_exists
from .data import Batch, PackedDataset, text_lines
from .step import init_optimizer_state, make_eval_step, make_optimizer, make_train_step, measure_peak_flops

SETTINGS = "run_settings.json"  # in checkpoint.dir: see run_settings
FREE_ON_RESUME = {"steps"}  # recorded, to announce a change, but free to change


def build_model(cfg: TrainConfig, mesh) -> InternLM2:
    m = cfg.model
    if m.checkpoint:
        model = InternLM2.from_pretrained(m.checkpoint, mesh=mesh, dtype=m.dtype, param_dtype=m.param_dtype)
    else:
        model = InternLM2(cfg.architecture(), mesh=mesh, dtype=m.dtype, param_dtype=m.param_dtype, seed=cfg.seed)
    model.configure(remat=m.remat)
    return model


class Metrics:
    """stdout, JSONL and (when installed) TensorBoard, from process 0."""

    def __init__(self, cfg: TrainConfig, start: int = 0):
        self.main = jax.process_index() == 0
        self.jsonl = Path(cfg.log.jsonl) if cfg.log.jsonl and self.main else None
        if self.jsonl:
            self.jsonl.parent.mkdir(parents=True, exist_ok=True)
            self.drop_records_after(start)
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

    def drop_records_after(self, step: int) -> None:
        """Rewrite the JSONL log (atomically) without its records past ``step``, the step this run starts
        from: a resumed run writes those steps again. A line cut short by a kill is dropped too."""
        if not self.jsonl.is_file():
            return
        lines = self.jsonl.read_text().splitlines(keepends=True)
        kept = [line for line in lines if _record_step(line) <= step]
        if kept != lines:
            atomic_write(self.jsonl, "".join(kept))
            print(f"{self.jsonl}: dropped {len(lines) - len(kept)} line(s) past step {step}", file=sys.stderr)

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


def _record_step(line: str) -> float:
    """The step of a metrics line; infinity for a line that is not a whole record."""
    try:
        return json.loads(line)["step"] if line.endswith("\n") else math.inf
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def _global_batch(batch: Batch, mesh, global_rows: int) -> dict:
    out = {}
    for name in ("inputs", "targets", "segment_ids", "loss_mask", "weight"):
        local = getattr(batch, name)
        shape = (global_rows,) + local.shape[1:]
        sharding = named_sharding(("batch", "seq"), shape, mesh)
        out[name] = jax.make_array_from_process_local_data(sharding, local, shape)
    return out


def process_rows(mesh, batch_size: int, seq_len: int) -> range:
    """The rows of each global batch that this process's devices hold, so the rows its loader reads.
    Split by process index when the batch axes span the processes; all of them when they do not (a mesh
    with only ``tensor`` or ``sequence`` across hosts: every process then feeds the same whole batch)."""
    shape = (batch_size, seq_len)
    held = named_sharding(("batch", "seq"), shape, mesh).addressable_devices_indices_map(shape).values()
    spans = {(i[0].start or 0, batch_size if i[0].stop is None else i[0].stop) for i in held}
    lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
    if sum(b - a for a, b in spans) != hi - lo:  # not one block of rows (an unusual device order)
        return range(batch_size)
    return range(lo, hi)


def _rows(batch: Batch, rows: range) -> Batch:
    """Rows ``rows`` of a batch that every process built whole."""
    sl = slice(rows.start, rows.stop)
    return Batch(*(getattr(batch, f)[sl] for f in ("inputs", "targets", "segment_ids", "loss_mask", "weight")))


def _checkpoint_manager(cfg: TrainConfig):
    if not cfg.checkpoint.dir:
        return None
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=cfg.checkpoint.keep, save_interval_steps=cfg.checkpoint.every,
                                           enable_async_checkpointing=cfg.checkpoint.async_save)
    return ocp.CheckpointManager(absolute(cfg.checkpoint.dir), options=options)  # (a URL refused)


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


def run_settings(cfg: TrainConfig, arch) -> dict:
    """What a resumed run must share with its checkpoints: what decides batch ``t`` (the sources and how
    they are read, seq_len, batch_size, seed, tokenizer) and the architecture. Free to change: ``steps``
    (see the module docstring), the optimizer's hyper-parameters, ``grad_accum`` (token-weighted, so the
    same step), the mesh, dtypes, eval, logging and checkpointing cadence (``steps`` is recorded, not
    checked)."""
    d = cfg.data
    absolute = lambda p: p if p in (None, "demo") else str(Path(p).absolute())  # noqa: E731
    return {"data.train": [absolute(p) for p in d.train], "data.format": d.format, "data.text_key": d.text_key,
            "data.bin_dtype": d.bin_dtype, "data.seq_len": d.seq_len, "data.batch_size": d.batch_size,
            "seed": cfg.seed, "tokenizer": absolute(cfg.tokenizer), "steps": cfg.steps,
            **{f"architecture.{k}": v for k, v in arch.to_dict().items() if k in Overrides.model_fields}}


def check_resume(folder: str, settings: dict) -> None:
    """Refuse to resume the checkpoints in ``folder`` with settings other than those they were made with."""
    file = Path(folder) / SETTINGS
    if not file.is_file():
        if jax.process_index() == 0:
            print(f"{folder}: no {SETTINGS} (an older run): resuming without checking its settings", file=sys.stderr)
        return
    saved = json.loads(file.read_text())
    for key, new in json.loads(json.dumps(settings)).items():  # as JSON has them (tuples are lists)
        if key in saved and saved[key] != new and key not in FREE_ON_RESUME:
            raise ValueError(f"{folder}: cannot resume with a different {key}: {saved[key]!r} in the checkpoints, "
                             f"{new!r} now (restore it, or use a new checkpoint.dir)")


def _announce_new_length(cfg: TrainConfig, step: int) -> None:
    """On stderr: ``steps`` differs from the run's recorded one, so the schedule changes (both lrs)."""
    file = Path(cfg.checkpoint.dir) / SETTINGS
    old = json.loads(file.read_text()).get("steps") if file.is_file() else None
    if jax.process_index() or not isinstance(old, int) or old == cfg.steps:
        return
    before, after = (float(make_optimizer(cfg.optim, n)[1](step)) for n in (old, cfg.steps))
    print(f"steps: {old} -> {cfg.steps}: the learning-rate schedule is now that of a {cfg.steps}-step run "
          f"(lr at step {step}: {before:.4g} -> {after:.4g})", file=sys.stderr, flush=True)


def record_run(folder: str, arch, settings: dict, tokenizer: list[tuple[Path, str]] = ()) -> None:
    """``config.json`` and the tokenizer's files (for ``convert train-to-hf``) and the run's settings,
    each written atomically."""
    if jax.process_index() == 0:
        arch.save(folder)
        for source, name in tokenizer:
            atomic_write(Path(folder) / name, Path(source).read_bytes())
        atomic_write(Path(folder) / SETTINGS, json.dumps(settings, indent=1) + "\n")


def tokenizer_files(cfg: TrainConfig, tok) -> list[tuple[Path, str]]:
    """``(path, name)`` of the files that make the run's tokenizer, for the folders it writes (an export,
    the checkpoints): the configured tokenizer's model (demo's too) with the HF tokenizer files beside it
    in its folder, or without one those of the checkpoint the run starts from. A folder the run
    exports then generates and chats as it is."""
    from ..checkpoint import TOKENIZER_FILES

    folder = None
    if tok is not None:
        files = [(Path(tok.model_file), "tokenizer.model")]
        if cfg.tokenizer != "demo":  # a folder, or the folder of the tokenizer.model given
            folder = Path(cfg.tokenizer) if Path(cfg.tokenizer).is_dir() else Path(cfg.tokenizer).parent
    else:
        files = []
        folder = Path(cfg.model.checkpoint) if cfg.model.checkpoint else None
    if folder is not None:
        taken = {name for _, name in files}
        files += [(folder / n, n) for n in TOKENIZER_FILES if n not in taken and (folder / n).is_file()]
    return files


def load_tokenizer(cfg: TrainConfig):
    """The configured tokenizer; ``tokenizer: demo`` trains a small SentencePiece model on the training
    text files (offline examples; a real checkpoint brings its own tokenizer.model) and keeps it beside
    the checkpoints, named by a digest of that text: a resumed run tokenizes the same way, and a run on
    other text beside it trains its own."""
    from ..tokenizer import Tokenizer

    if not cfg.tokenizer:
        return None
    if cfg.tokenizer != "demo":
        return Tokenizer.from_pretrained(cfg.tokenizer)
    if not cfg.checkpoint.dir:
        raise ValueError("tokenizer: demo is trained once and kept beside the checkpoints, so that a resumed run "
                         "tokenizes the same way: set checkpoint.dir (or a real tokenizer.model)")
    texts = []
    for file in cfg.data.train:
        if not file.endswith(".txt"):
            raise ValueError(f"tokenizer: demo trains on plain .txt files; {file} is not one (set a real tokenizer)")
        check_exists(Path(file))
        texts += [line.rstrip("\r\n") for _, line in text_lines(Path(file))]
    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:12]
    path = Path(cfg.checkpoint.dir).parent / f"demo_tokenizer-{digest}.model"
    if path.is_file():
        return Tokenizer(path)
    print(f"tokenizer: demo: trained a small SentencePiece model on the training text -> {path}", file=sys.stderr)
    return Tokenizer.train(texts, path)


def evaluate(eval_fn, params, eval_data: PackedDataset, mesh, batch_size: int) -> float:
    """Perplexity on every window of the eval data."""
    rows = process_rows(mesh, batch_size, eval_data.seq_len)
    sums = [jax.device_get(eval_fn(params, _global_batch(_rows(b, rows), mesh, batch_size)))
            for b in eval_data.eval_batches(batch_size)]
    total, count = (sum(float(x[i]) for x in sums) for i in (0, 1))
    return math.exp(total / count) if count else float("nan")


def train(cfg: TrainConfig) -> list[dict]:
    """Run (or resume) training as configured; returns the metric records of this process."""
    cfg.validate()
    arch = cfg.architecture()
    if cfg.export_hf:  # refused now rather than after the last step, and never onto the run's inputs or checkpoints
        sources = [Path(p) for p in (cfg.checkpoint.dir, cfg.model.checkpoint, *cfg.data.train, cfg.data.eval) if p]
        try:
            dst = absolute(cfg.export_hf)
            inside = next((src for src in sources if absolute(src) in dst.parents), None)
            if inside is not None:  # (check_destination refuses that only once dst exists: a rerun would fail)
                raise ValueError(f"destination {dst} is inside {inside}, a folder the run reads or writes")
            check_destination(dst, True, sources=sources, markers=CHECKPOINT_MARKERS)
        except (ValueError, OSError) as e:
            raise ValueError(f"export_hf: {e}") from None
    rendezvous("config check")  # many hosts: a config that fails on any process ends every process now
    mgr = _checkpoint_manager(cfg)
    resume_at = mgr.latest_step() if mgr is not None else None
    settings = run_settings(cfg, arch)
    if resume_at is not None:
        try:
            check_resume(cfg.checkpoint.dir, settings)
            if cfg.steps < resume_at:
                raise ValueError(f"steps: {cfg.steps} is below step {resume_at} of the checkpoints in "
                                 f"{cfg.checkpoint.dir} (raise it to continue, or use a new checkpoint.dir)")
        except ValueError:
            mgr.close()
            raise
        _announce_new_length(cfg, resume_at)
    mesh = make_mesh(**cfg.mesh.model_dump())
    tok = load_tokenizer(cfg)
    tok_files = tokenizer_files(cfg, tok)  # copied beside the checkpoints and into an export
    if tok is not None and tok.vocab_size > arch.vocab_size:
        raise ValueError(f"tokenizer: {tok.model_file} has {tok.vocab_size} token ids, more than the model's "
                         f"vocab_size {arch.vocab_size}")
    if tok is not None and tok.vocab_size < arch.vocab_size and jax.process_index() == 0:
        print(f"tokenizer: {tok.model_file} has {tok.vocab_size} token ids, fewer than the model's vocab_size "
              f"{arch.vocab_size}: ids {tok.vocab_size}.. have no text, and generating one fails to decode "
              f"(set model.overrides.vocab_size: {tok.vocab_size} to match)", file=sys.stderr, flush=True)
    d = cfg.data
    data = PackedDataset(d.train, tok, d.seq_len, text_key=d.text_key, seed=cfg.seed, fmt=d.format,
                         bin_dtype=d.bin_dtype, vocab_size=arch.vocab_size)
    eval_data = PackedDataset([d.eval], tok, d.seq_len, text_key=d.text_key, fmt=d.format,
                              bin_dtype=d.bin_dtype, vocab_size=arch.vocab_size) if d.eval else None
    rows = process_rows(mesh, d.batch_size, d.seq_len)
    loader = iter(data.loader(d.batch_size, cfg.steps, rows, threads=d.loader_threads, prefetch=d.prefetch))
    rendezvous("data check")  # and so does a tokenizer or data path that is bad on one host
    same = cfg.shared_settings()  # or the processes train differently (optim.lr), or hang (eval_every)
    same.update({f"mesh.{axis}": size for axis, size in mesh.shape.items()})  # as resolved on each host's devices
    same["the model's architecture"] = repr(arch)
    check_same(same, "training configs")
    model = build_model(cfg, mesh)
    graphdef, params = nnx.split(model)
    tx, schedule = make_optimizer(cfg.optim, cfg.steps)
    opt_state = init_optimizer_state(tx, params, mesh)
    options = model.scan_compiler_options() or None
    step_fn = jax.jit(make_train_step(graphdef, tx, grad_accum=cfg.optim.grad_accum, segments=d.segment_masking,
                                      z_loss=cfg.optim.z_loss, schedule=schedule, loss_chunk=cfg.model.loss_chunk),
                      donate_argnums=(0, 1), compiler_options=options)
    eval_fn = jax.jit(make_eval_step(graphdef, segments=d.segment_masking, loss_chunk=cfg.model.loss_chunk),
                      compiler_options=options)
    start = 0
    if resume_at is not None:
        start = resume_at
        params, opt_state = _restore(mgr, start, params, opt_state, loader)
        print(f"resumed from {cfg.checkpoint.dir} at step {start}", flush=True)
    if mgr is not None:
        record_run(cfg.checkpoint.dir, model.config, settings, tok_files)
    metrics = Metrics(cfg, start)
    flops_per_token = model.config.train_flops_per_token(d.seq_len)
    peak = (cfg.log.peak_tflops * 1e12 if cfg.log.peak_tflops else measure_peak_flops()) * jax.device_count()
    history = []
    t_last, logged = time.perf_counter(), start  # the time and step of the last log
    # one process: Ctrl-C stops between steps, after the save under way (many: the CLI leaves at once, since
    # the processes would each stop at a different step)
    interrupts = HeldInterrupt("training stops after this step (and saves it)")
    if jax.process_count() == 1:
        interrupts.arm()
    completed = start  # the last step whose results params and opt_state hold
    try:
        for step in range(start, cfg.steps):
            interrupts.check()
            batch = _global_batch(next(loader), mesh, d.batch_size)
            params, opt_state, m = step_fn(params, opt_state, batch, step)
            done = completed = step + 1
            record = {}
            if done % cfg.log.every == 0 or done == cfg.steps:
                m = jax.device_get(m)
                now = time.perf_counter()
                tokens_per_s = (done - logged) * d.batch_size * d.seq_len / (now - t_last)
                t_last, logged = now, done
                record = {"loss": float(m["loss"]), "ce": float(m["ce"]), "lr": float(m["lr"]),
                          "grad_norm": float(m["grad_norm"]), "tokens_per_s": tokens_per_s,
                          "mfu": tokens_per_s * flops_per_token / peak}
            if eval_data is not None and cfg.eval_every and done % cfg.eval_every == 0:
                t_eval = time.perf_counter()
                record["eval_ppl"] = evaluate(eval_fn, params, eval_data, mesh, d.batch_size)
                t_last += time.perf_counter() - t_eval  # the throughput counts training time only
            if record:
                record = {"step": done, **record}
                metrics.write(record)
                history.append(record)
            if mgr is not None:
                _save(mgr, done, params, opt_state, loader, force=done == cfg.steps)
                if done < cfg.steps and jax.process_count() > 1 and mgr.reached_preemption(done):
                    mgr.wait_until_finished()  # a job's SIGTERM: every process saved this step (Orbax's
                    mgr.close()  # preemption policy); stop here, the same command resumes from it
                    metrics.close()
                    raise RuntimeError(f"preempted (SIGTERM): stopped after saving step {done} in "
                                       f"{cfg.checkpoint.dir}; run the same command again to resume")
        interrupts.check()  # Ctrl-C in the last step: stop here too, before the export
    except KeyboardInterrupt:
        if mgr is not None and jax.process_count() == 1:  # (many: waiting on the others could hang)
            if completed > (mgr.latest_step() or 0):  # the steps since the last periodic save are kept too
                _save(mgr, completed, params, opt_state, loader, force=True)
            mgr.wait_until_finished()  # the save under way is completed, not left half written
            mgr.close()
            print(f"interrupted: checkpoints up to step {mgr.latest_step()} are in {cfg.checkpoint.dir}; "
                  "run the same command again to resume", file=sys.stderr, flush=True)
        raise
    finally:
        interrupts.disarm()
    if mgr is not None:
        mgr.wait_until_finished()
        mgr.close()
    metrics.close()
    nnx.update(model, params)
    if cfg.export_hf:  # every process gathers, process 0 writes (see save_pretrained)
        model.save_pretrained(cfg.export_hf, overwrite=True, dtype=cfg.model.param_dtype,
                              extra_files=tok_files)
    return history
