"""Loss, optimizer and the jitted train step (a pure function of params and optimizer state).

Parameters are the model's ``nnx.State`` (a pytree of arrays) in ``param_dtype`` (float32 master
weights); the forward casts them to the compute dtype. Gradient accumulation scans
over micro-batches inside the one compiled step; each micro-batch's summed token losses are divided by
the whole batch's count of trained tokens, so the accumulated loss and gradient are those of the whole
batch at once, however the trained tokens fall into micro-batches (chat data: some have none).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from .loss import LOSS_CHUNK, token_losses

if TYPE_CHECKING:  # the step itself needs no pydantic (the GPU bench image has none)
    from .config import OptimSection

DECAYED = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")


def make_optimizer(cfg: "OptimSection", total_steps: int) -> tuple[optax.GradientTransformation, Any]:
    """AdamW with linear warmup and cosine decay, global-norm clipping, and a weight-decay mask.

    The schedule is optax's (and HF's ``get_cosine_with_min_lr_schedule_with_warmup``): update ``t``
    (from 0) uses ``lr * t / warmup_steps`` during warmup, so the first one is at lr 0 when there is a
    warmup and at the peak lr when ``warmup_steps`` is 0."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup_steps,
                                                  max(total_steps, cfg.warmup_steps + 1),
                                                  end_value=cfg.lr * cfg.min_lr_ratio)

    def decay_mask(params):
        def keep(path, _):
            names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
            return cfg.decay_embeddings_and_norms or names[-1] in DECAYED
        return jax.tree_util.tree_map_with_path(keep, params)

    tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm > 0 else optax.identity(),
                     optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                 mask=decay_mask))
    return tx, schedule


def optimizer_shardings(tx: optax.GradientTransformation, params, mesh):
    """Shardings of ``tx.init(params)``: every parameter-shaped leaf (AdamW's mu and nu) sharded like
    its parameter, the rest (step counters) replicated. ``jit(tx.init)`` alone would not do this:
    zeros_like does not read its input, so nothing propagates the parameters' shardings to it."""
    from jax.sharding import NamedSharding, PartitionSpec

    shapes = jax.eval_shape(tx.init, params)
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    return optax.tree_map_params(tx, lambda _, sharding: sharding, shapes, param_shardings,
                                 transform_non_params=lambda _: NamedSharding(mesh, PartitionSpec()))


def init_optimizer_state(tx: optax.GradientTransformation, params, mesh):
    """``tx.init(params)`` created directly in :func:`optimizer_shardings` (never whole on one device)."""
    return jax.jit(tx.init, out_shardings=optimizer_shardings(tx, params, mesh))(params)


def trained_tokens(batch, segments: bool) -> jax.Array:
    """float32 ``[B, S]``: 1 on the targets the loss covers."""
    return batch["weight"] * (batch["loss_mask"] if segments else 1.0)


def loss_fn(params, graphdef, batch, *, segments: bool, z_loss: float, loss_chunk: int = LOSS_CHUNK,
            tokens: jax.Array | None = None):
    """Next-token cross-entropy (float32) plus optional z-loss, summed over the trained targets and
    divided by ``tokens`` (default: this batch's count of them, i.e. the mean); returns
    ``(loss, (summed cross-entropy, trained targets))``.

    ``loss_chunk``: vocabulary columns per chunk of the fused output layer and loss
    (:mod:`internlm_jax.training.loss`); 0 builds the logits whole."""
    model = nnx.merge(graphdef, params)
    hidden = model.final_hidden(batch["inputs"], segment_ids=batch["segment_ids"] if segments else None)
    ce_tokens, logz = token_losses(model, hidden, batch["targets"], loss_chunk)
    mask = trained_tokens(batch, segments)
    tokens = jnp.maximum(mask.sum(), 1.0) if tokens is None else tokens
    ce_sum = (ce_tokens * mask).sum()
    total = ce_sum + (z_loss * (logz ** 2 * mask).sum() if z_loss else 0.0)
    return total / tokens, (ce_sum, mask.sum())


def make_train_step(graphdef, tx, *, grad_accum: int, segments: bool, z_loss: float, schedule,
                    loss_chunk: int = LOSS_CHUNK):
    """``step(params, opt_state, batch, step_number) -> (params, opt_state, metrics)``, to be jitted."""

    def train_step(params, opt_state, batch, step_number):
        tokens = jnp.maximum(trained_tokens(batch, segments).sum(), 1.0)  # of the whole batch
        micro = jax.tree.map(lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        def accumulate(carry, mb):
            g_sum, loss_sum, ce_sum = carry
            (loss, (ce, _)), g = grad_fn(params, graphdef, mb, segments=segments, z_loss=z_loss,
                                         loss_chunk=loss_chunk, tokens=tokens)
            return (jax.tree.map(jnp.add, g_sum, g), loss_sum + loss, ce_sum + ce), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        (grads, loss, ce_sum), _ = jax.lax.scan(accumulate, (zeros, 0.0, 0.0), micro)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {"loss": loss, "ce": ce_sum / tokens,
                   "grad_norm": (optax.tree.norm(grads) if hasattr(optax, "tree") and hasattr(optax.tree, "norm")
                                 else optax.global_norm(grads)),
                   "lr": schedule(step_number)}
        return params, opt_state, metrics

    return train_step


def make_eval_step(graphdef, *, segments: bool, loss_chunk: int = LOSS_CHUNK):
    """``(params, batch) -> (sum of token losses, number of tokens)``."""
    def eval_step(params, batch):
        _, (ce_sum, count) = loss_fn(params, graphdef, batch, segments=segments, z_loss=0.0, loss_chunk=loss_chunk)
        return ce_sum, count
    return eval_step


def measure_peak_flops(n: int = 1024, repeats: int = 5, dtype=jnp.float32) -> float:
    """Matmul FLOP/s of one device in ``dtype``, measured now (for the MFU estimate when no peak is
    configured), on random operands (constant ones run faster on some GPUs and would lower the MFU)."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best
