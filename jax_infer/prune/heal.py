"""Healing: a short distillation of a pruned model toward the original's next-token
distributions on calibration text.

The loss is KL(teacher || student) of the softmax over the vocabulary at every position of
each calibration sequence (temperature 1), averaged over tokens. The teacher's logits are
computed inside the jitted step (no [tokens, V] cache on the host: 200 KB per token for a
49k vocabulary). The optimizer is optax AdamW under a linear warm-up and cosine decay, with
global-norm clipping.

By default only the decoder layers and the final norm train; the embedding (and LM head) stay
frozen: they are a fifth of SmolLM2's weights and their gradient is the costliest, while the
damage pruning does is inside the stack.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_infer.config import ModelConfig
from jax_infer.model.llama import Llama
from jax_infer.prune.calibration import full_causal_attention

FROZEN = ("embed", "lm_head")


@dataclasses.dataclass(frozen=True)
class HealConfig:
    """steps: optimizer steps; batch_size: sequences per step; learning_rate: the peak;
    warmup_steps: linear warm-up from 0; final_lr_fraction: the cosine ends at this fraction
    of the peak; weight_decay: AdamW's decoupled decay; clip_norm: global gradient norm;
    train_embeddings: also train embed / lm_head."""

    steps: int = 100
    batch_size: int = 4
    learning_rate: float = 1e-4
    warmup_steps: int = 10
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    train_embeddings: bool = False
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"HealConfig.{name}={v!r} is invalid: must be an int >= 1")
        if not isinstance(self.warmup_steps, int) or not 0 <= self.warmup_steps < self.steps:
            raise ValueError(
                f"HealConfig.warmup_steps={self.warmup_steps!r} is invalid: must be an int in "
                f"[0, steps={self.steps})"
            )
        if not self.learning_rate > 0:
            raise ValueError(f"HealConfig.learning_rate={self.learning_rate!r} must be > 0")
        if not 0.0 <= self.final_lr_fraction <= 1.0:
            raise ValueError(
                f"HealConfig.final_lr_fraction={self.final_lr_fraction!r} must be in [0, 1]"
            )


def model_logits(params, config: ModelConfig, tokens, dtype=jnp.float32):
    """f32[B, T, V] logits at every position of tokens i32[B, T] (positions 0..T-1, causal),
    through the model's own `Llama` with a cache-free attend_fn."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    attend_fn = full_causal_attention(t)
    logits, _ = Llama(config, dtype).apply(
        {"params": params}, tokens, positions, [None] * config.num_layers, attend_fn
    )
    return logits


def kl_divergence(teacher_logits, student_logits):
    """Mean over tokens of KL(softmax(teacher) || softmax(student))."""
    lt = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1)
    ls = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
    return jnp.mean(jnp.sum(jnp.exp(lt) * (lt - ls), axis=-1))


def _split(params: dict, train_embeddings: bool) -> tuple[dict, dict]:
    if train_embeddings:
        return dict(params), {}
    trainable = {k: v for k, v in params.items() if k not in FROZEN}
    frozen = {k: v for k, v in params.items() if k in FROZEN}
    return trainable, frozen


@functools.partial(jax.jit, static_argnames=("student_config", "teacher_config"))
def _batch_kl(student, teacher, x, *, student_config, teacher_config):
    return kl_divergence(
        model_logits(teacher, teacher_config, x), model_logits(student, student_config, x)
    )


def distillation_loss(
    student: dict,
    student_config: ModelConfig,
    teacher: dict,
    teacher_config: ModelConfig,
    tokens: np.ndarray,
    *,
    batch_size: int = 4,
) -> float:
    """KL(teacher || student) averaged over every token of tokens i32[num_seqs, seq_len]."""
    tokens = np.asarray(tokens, np.int32)
    total, count = 0.0, 0
    for i in range(0, len(tokens), batch_size):
        x = tokens[i : i + batch_size]
        kl = _batch_kl(
            student,
            teacher,
            jnp.asarray(x),
            student_config=student_config,
            teacher_config=teacher_config,
        )
        total += float(kl) * x.size
        count += x.size
    return total / count


def heal(
    student: dict,
    student_config: ModelConfig,
    teacher: dict,
    teacher_config: ModelConfig,
    tokens: np.ndarray,
    heal_config: HealConfig = HealConfig(),
    *,
    progress: bool = False,
) -> tuple[dict, dict]:
    """Distill `teacher` into `student` on calibration tokens i32[num_seqs, seq_len].

    Returns (healed params, history: per-step losses, learning rates and seconds). Float32
    training; params come back as float32 arrays of the student's shapes.
    """
    hc = heal_config
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 2 or len(tokens) < 1:
        raise ValueError(f"tokens must be i32[num_seqs, seq_len]; got shape {tokens.shape}")
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=hc.learning_rate,
        warmup_steps=hc.warmup_steps,
        decay_steps=hc.steps,
        end_value=hc.learning_rate * hc.final_lr_fraction,
    )
    optimizer = optax.chain(
        optax.clip_by_global_norm(hc.clip_norm),
        optax.adamw(schedule, weight_decay=hc.weight_decay),
    )
    student = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), student)
    teacher = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), teacher)
    trainable, frozen = _split(student, hc.train_embeddings)
    opt_state = optimizer.init(trainable)

    def loss_fn(trainable, frozen, teacher_logits, x):
        logits = model_logits({**trainable, **frozen}, student_config, x)
        return kl_divergence(teacher_logits, logits)

    # Everything large is an argument: a closed-over array would become a program constant.
    @jax.jit
    def step(trainable, frozen, opt_state, teacher, x):
        teacher_logits = jax.lax.stop_gradient(model_logits(teacher, teacher_config, x))
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, teacher_logits, x)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    rng = np.random.default_rng(hc.seed)
    order = np.array([], np.int64)
    history = {"loss": [], "learning_rate": [], "seconds": 0.0}
    t0 = time.perf_counter()
    for i in range(hc.steps):
        if len(order) < hc.batch_size:  # a fresh permutation each pass over the sequences
            order = np.concatenate([order, rng.permutation(len(tokens))])
        idx, order = order[: hc.batch_size], order[hc.batch_size :]
        trainable, opt_state, loss = step(
            trainable, frozen, opt_state, teacher, jnp.asarray(tokens[idx])
        )
        history["loss"].append(float(loss))
        history["learning_rate"].append(float(schedule(i)))
        if progress:
            print(
                f"\rheal step {i + 1}/{hc.steps} loss {float(loss):.4f} "
                f"({time.perf_counter() - t0:.0f} s)",
                end="",
                flush=True,
            )
    if progress:
        print(flush=True)
    history["seconds"] = time.perf_counter() - t0
    return {**trainable, **frozen}, history
