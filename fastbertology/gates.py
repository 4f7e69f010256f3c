"""Learned head gates: hard-concrete L0 gates on every head (or key/value group), trained with frozen weights.

Louizos, Welling & Kingma 2018 ("Learning Sparse Neural Networks through L0 Regularization"), as Voita et al. 2019
("Analyzing Multi-Head Self-Attention") put one gate on each attention head. Every gate g has a parameter
``log_alpha[g]``; with temperature ``beta = 2/3`` and stretch ``(gamma, zeta) = (-0.1, 1.1)``:

* sample: ``u ~ U(0, 1)``, ``s = sigmoid((log u - log(1 - u) + log_alpha) / beta)``,
  ``z = clamp(s * (zeta - gamma) + gamma, 0, 1)`` (exact 0 and 1 have positive probability);
* open probability (the expected L0 norm of one gate): ``P(z != 0) = sigmoid(log_alpha - beta * log(-gamma / zeta))``;
* deterministic gate (Louizos's test-time estimate): ``clamp(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1)``,
  above 1/2 exactly when ``log_alpha > 0``.

The sampled gates enter the model as a per-example head mask ``[B, L, H]`` (one independent sample per example)
through the patch's differentiable head-mask path: the fused kernels' mask gradient is the only gradient computed
(parameters frozen). The objective is the task loss plus either

* a penalty ``lambda * L0`` (``l0_penalty``), with ``L0 = sum of the open probabilities`` (expected open gates), or
* a Lagrangian towards ``target`` expected open gates (Sheared-LLaMA, Xia et al. 2023):
  ``lambda1 * (L0 - target) + lambda2 * (L0 - target) ** 2``, where the multipliers ``lambda1, lambda2`` (starting at
  0) take gradient *ascent* steps while the gates take descent steps. The target is warmed up: it moves linearly
  from the initial expected L0 to ``target`` over the first ``warmup_steps`` (half the steps by default), so that
  the gates that matter least close first.

The final deterministic mask keeps the gates with ``log_alpha > 0`` (penalty), or exactly the ``target`` gates with
the largest ``log_alpha`` (Lagrangian). With ``per_kv_group`` one gate covers the query heads of a key/value head
(grouped-query attention, as DuoAttention gates key/value heads); L0 and ``target`` then count groups.

Everything here is a pure function of its inputs (no file IO).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .architectures import heads_per_layer, kv_heads_per_layer
from .importance import examples_in, frozen_parameters, require_patched
from .tasks import TaskProtocol

__all__ = ["TEMPERATURE", "STRETCH", "GateResult", "sample_gates", "deterministic_gates", "open_probability",
           "lagrangian", "gate_mask", "expand_groups", "learn_gates"]

TEMPERATURE = 2.0 / 3.0
STRETCH = (-0.1, 1.1)  # (gamma, zeta)
_EPS = 1e-6


def sample_gates(log_alpha: torch.Tensor, shape: Sequence[int] = (), *, generator: torch.Generator | None = None,
                 temperature: float = TEMPERATURE, stretch: tuple[float, float] = STRETCH) -> torch.Tensor:
    """Hard-concrete samples ``[*shape, *log_alpha.shape]`` in [0, 1], differentiable in ``log_alpha``."""
    gamma, zeta = stretch
    size = (*shape, *log_alpha.shape)
    u = torch.rand(size, generator=generator, dtype=log_alpha.dtype, device="cpu").to(log_alpha.device)
    u = u.clamp(_EPS, 1 - _EPS)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / temperature)
    return (s * (zeta - gamma) + gamma).clamp(0.0, 1.0)


def deterministic_gates(log_alpha: torch.Tensor, *, stretch: tuple[float, float] = STRETCH) -> torch.Tensor:
    """Louizos et al.'s test-time gates ``clamp(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1)``."""
    gamma, zeta = stretch
    return (torch.sigmoid(log_alpha) * (zeta - gamma) + gamma).clamp(0.0, 1.0)


def open_probability(log_alpha: torch.Tensor, *, temperature: float = TEMPERATURE,
                     stretch: tuple[float, float] = STRETCH) -> torch.Tensor:
    """``P(z != 0) = sigmoid(log_alpha - temperature * log(-gamma / zeta))`` per gate; its sum is the expected L0."""
    gamma, zeta = stretch
    return torch.sigmoid(log_alpha - temperature * math.log(-gamma / zeta))


def lagrangian(l0: torch.Tensor, target: float, lambda1: torch.Tensor, lambda2: torch.Tensor) -> torch.Tensor:
    """Sheared-LLaMA's constraint term ``lambda1 * (l0 - target) + lambda2 * (l0 - target) ** 2``."""
    gap = l0 - target
    return lambda1 * gap + lambda2 * gap * gap


def gate_mask(log_alpha: torch.Tensor, *, target: int | None = None) -> torch.Tensor:
    """The deterministic 0/1 mask of the gates (same shape): ``log_alpha > 0`` (deterministic gate above 1/2), or,
    with ``target``, exactly the ``target`` gates of largest ``log_alpha`` (ties: the lower index)."""
    if target is None:
        return (log_alpha > 0).to(torch.float32)
    flat = log_alpha.detach().flatten().double()
    order = torch.sort(-flat, stable=True).indices[:target]
    mask = torch.zeros_like(flat, dtype=torch.float32)
    mask[order] = 1.0
    return mask.view(log_alpha.shape)


def expand_groups(gates: torch.Tensor, heads: int) -> torch.Tensor:
    """Gates ``[..., L, G]`` over G key/value groups -> ``[..., L, H]`` (query head h belongs to group
    ``h // (H / G)``, as grouped-query attention reads key/value head ``h // (H / H_kv)``)."""
    groups = gates.shape[-1]
    return gates if groups == heads else gates.repeat_interleave(heads // groups, dim=-1)


@dataclass
class GateResult:
    """What :func:`learn_gates` returns. Tables are float64 ``[L, H]`` on the CPU (per key/value group gates
    are expanded to their heads; ``log_alpha`` keeps the gates' own shape ``[L, G]``).

    gates:       open probability ``P(z != 0)`` of every head's gate.
    head_mask:   the deterministic 0/1 mask (float32), ready for ``prune --head-mask``.
    log_alpha:   the learned parameters ``[L, G]`` (G = H, or the key/value heads with ``per_kv_group``).
    curve:       one entry per step: ``step``, ``loss`` (task loss), ``l0`` (expected open gates), ``objective``,
                 ``open`` (gates with ``log_alpha > 0``), and with a target ``target`` (warmed up), ``lambda1``,
                 ``lambda2``.
    mode:        ``"penalty"`` or ``"target"``; ``target`` / ``l0_penalty`` as given; ``per_kv_group``.
    """

    gates: torch.Tensor
    head_mask: torch.Tensor
    log_alpha: torch.Tensor
    curve: list[dict] = field(default_factory=list)
    mode: str = "penalty"
    target: int | None = None
    l0_penalty: float | None = None
    per_kv_group: bool = False
    steps: int = 0
    seconds: float = 0.0


def _warmed_up(start: float, target: float, step: int, warmup: int) -> float:
    """The Lagrangian's target at ``step`` (1-based): linear from ``start`` to ``target`` over ``warmup`` steps."""
    if warmup <= 0 or step >= warmup:
        return target
    return start + (target - start) * step / warmup


def _gate_shape(model: nn.Module, per_kv_group: bool) -> tuple[int, int, int]:
    """``(layers, heads, gates per layer)``; ValueError for unequal head counts or groups."""
    counts = heads_per_layer(model)
    if len(set(counts)) != 1:
        raise ValueError(f"layers have different head counts {counts} (pruned model): learn gates on the unpruned "
                         "model")
    heads = counts[0]
    if not per_kv_group:
        return len(counts), heads, heads
    groups = kv_heads_per_layer(model)
    if len(set(groups)) != 1 or heads % groups[0]:
        raise ValueError(f"per_kv_group needs the same number of key/value heads in every layer, dividing the "
                         f"{heads} query heads; this model has {groups}")
    return len(counts), heads, groups[0]


def learn_gates(model: nn.Module, batches: Sequence[dict], task: TaskProtocol, *, steps: int = 300,
                learning_rate: float = 0.1, l0_penalty: float | None = None, target: int | None = None,
                lagrangian_learning_rate: float = 0.01, warmup_steps: int | None = None,
                per_kv_group: bool = False, seed: int = 0, initial_log_alpha: float = 3.0,
                progress: bool = False) -> GateResult:
    """Learn hard-concrete gates on a patched ``model`` (weights frozen) over ``steps`` batches of ``batches``
    (cycled in order). Exactly one of ``l0_penalty`` (loss + ``l0_penalty`` * L0) and ``target`` (the Lagrangian
    towards ``target`` expected open gates) must be given; see the module docstring.

    learning_rate:            Adam's step size for ``log_alpha``.
    lagrangian_learning_rate: Adam's step size (ascent) for the multipliers; smaller than ``learning_rate`` so that
                              the multipliers do not outrun the task loss (a squeeze that closes every gate alike).
    warmup_steps:             the Lagrangian's target moves linearly from the initial expected L0 to ``target``
                              over these steps (Sheared-LLaMA's warmup; default: half of ``steps``), so that the
                              gates that matter least close first.
    initial_log_alpha:        every gate starts here (3.0: open with probability 0.99).
    seed:                     seeds the gate samples (a generator of its own; the global RNG is untouched).
    """
    require_patched(model)
    if (l0_penalty is None) == (target is None):
        raise ValueError("give exactly one of l0_penalty (loss + penalty * L0) and target (a number of open gates)")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not batches:
        raise ValueError("no batches to learn the gates on")
    if not learning_rate > 0 or not lagrangian_learning_rate > 0:
        raise ValueError(f"learning rates must be positive, got {learning_rate} and {lagrangian_learning_rate}")
    layers, heads, groups = _gate_shape(model, per_kv_group)
    if target is not None and not 1 <= target <= layers * groups:
        what = "key/value groups" if per_kv_group and groups != heads else "heads"
        raise ValueError(f"target must be between 1 and the model's {layers * groups} {what}, got {target}")
    if l0_penalty is not None and l0_penalty < 0:
        raise ValueError(f"l0_penalty must not be negative, got {l0_penalty}")
    if warmup_steps is not None and warmup_steps < 0:
        raise ValueError(f"warmup_steps must not be negative, got {warmup_steps}")
    started = time.perf_counter()
    device = next(model.parameters()).device
    log_alpha = torch.full((layers, groups), float(initial_log_alpha), dtype=torch.float32, device=device,
                           requires_grad=True)
    optimizer = torch.optim.Adam([log_alpha], lr=learning_rate)
    multipliers = torch.zeros(2, dtype=torch.float32, device=device, requires_grad=True)  # lambda1, lambda2
    ascent = torch.optim.Adam([multipliers], lr=lagrangian_learning_rate, maximize=True)
    generator = torch.Generator().manual_seed(seed)
    warmup = max(steps // 2, 1) if warmup_steps is None else warmup_steps
    start_l0 = float(open_probability(log_alpha.detach()).sum())
    curve = []
    with frozen_parameters(model):
        for step in tqdm(range(steps), desc="gates", disable=not progress, unit="step"):
            batch = batches[step % len(batches)]
            gates = expand_groups(sample_gates(log_alpha, (examples_in(task, batch),), generator=generator), heads)
            loss = task.evaluate(model, batch, head_mask=gates).loss  # gates: [B, L, H]
            l0 = open_probability(log_alpha).sum()
            if target is None:
                objective = loss + l0_penalty * l0
            else:
                goal = _warmed_up(start_l0, float(target), step + 1, warmup)
                objective = loss + lagrangian(l0, goal, multipliers[0], multipliers[1])
            optimizer.zero_grad()
            ascent.zero_grad()
            objective.backward()
            optimizer.step()
            if target is not None:
                ascent.step()
            point = {"step": step + 1, "loss": float(loss.detach()), "l0": float(l0.detach()),
                     "objective": float(objective.detach()), "open": int((log_alpha.detach() > 0).sum())}
            if target is not None:
                point.update(target=goal, lambda1=float(multipliers[0].detach()),
                             lambda2=float(multipliers[1].detach()))
            curve.append(point)
    learned = log_alpha.detach().cpu()
    return GateResult(
        gates=expand_groups(open_probability(learned.double()), heads),
        head_mask=expand_groups(gate_mask(learned, target=target), heads),
        log_alpha=learned.double(), curve=curve, mode="penalty" if target is None else "target", target=target,
        l0_penalty=l0_penalty, per_kv_group=per_kv_group, steps=steps, seconds=time.perf_counter() - started)
