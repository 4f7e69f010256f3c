"""Models larger than one GPU: the frozen model's transformer layers sharded across the processes of a torchrun
job with PyTorch FSDP2 (``fully_shard``), combined with the existing data parallelism: :func:`shard_model`,
:func:`sharded_setup`. Why FSDP2 and not transformers' ``device_map``: docs/large-models.md.

Each transformer layer is one FSDP unit: its parameters are split in equal parts over the processes (1/N each)
and all-gathered just before the layer runs, forward and again in the backward (``reshard_after_forward``), then
freed. The weights are frozen and no optimizer runs, so the backward computes only activation gradients (the
head-mask gradient) and FSDP never reduce-scatters a weight gradient: the cost is two all-gathers of each layer
per batch. The embeddings, final norm and language-model head stay whole on every process (they are a small
part of an LLM, and tied input/output embeddings stay tied). Every process still takes its own share of the
batches (:func:`fastbertology.distributed.shard`), so data parallelism and sharding are the same processes: with
several machines of G GPUs each the layers are sharded over the G GPUs of a machine and replicated across
machines (FSDP2's hybrid sharding over a ``(machines, G)`` device mesh), so the all-gathers stay on the fast links
inside a machine.
"""

from __future__ import annotations

import dataclasses
import os

import torch
from torch import nn

from . import distributed
from .architectures import transformer_layers
from .batching import move_batch


def check_sharding(args) -> bool:
    """Whether the command asks for ``--shard-model``; ValueError, before any work, where it cannot run."""
    if not getattr(args, "shard_model", False):
        return False
    if not distributed.is_distributed():
        raise ValueError("--shard-model shards the model over the processes of a torchrun job: start it with "
                         "torchrun --nproc-per-node N (N >= 2)")
    if getattr(args, "head_types", False):
        raise ValueError("--head-types does not combine with --shard-model (its passes are not matched across the "
                         "processes); score head types on one GPU, or without --shard-model")
    return True


def device_mesh(device: torch.device):
    """The device mesh for sharding: 1-D over all processes on one machine; ``(machines, processes per machine)``
    (replicate, shard) when torchrun's ``LOCAL_WORLD_SIZE`` is smaller than the world."""
    from torch.distributed.device_mesh import init_device_mesh

    world = distributed.world_size()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if 1 < local < world and world % local == 0:
        return init_device_mesh(device.type, (world // local, local), mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))


def shard_model(model: nn.Module, device: torch.device, *, mesh=None) -> nn.Module:
    """Shard ``model``'s transformer layers over the processes (FSDP2 ``fully_shard``, one unit per layer) and
    move everything else to ``device``; in place, and returned. Call after :func:`fastbertology.patch` and with
    the model on the CPU, so that no process ever holds all of its layers on the GPU (each layer is moved to the
    device and split there, one at a time). Needs an initialised process group (torchrun)."""
    from torch.distributed.fsdp import fully_shard

    if not distributed.is_distributed():
        raise ValueError("--shard-model shards the model over the processes of a torchrun job: start it with "
                         "torchrun --nproc-per-node N (N >= 2)")
    layers = transformer_layers(model)
    if len({id(layer) for layer in layers}) != len(layers):
        raise ValueError(f"{model.config.model_type} applies the same layer several times (shared weights): its "
                         "layers cannot be sharded; run it without --shard-model")
    mesh = mesh or device_mesh(device)
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    model._fastbertology_sharded = True
    sharded = {id(p) for layer in layers for p in layer.parameters()}
    moved: dict[int, nn.Parameter] = {}  # old parameter -> new one: tied parameters stay one parameter
    for module in model.modules():  # what is not sharded: whole on every process, on the device
        for name, parameter in list(module._parameters.items()):
            if parameter is None or id(parameter) in sharded or parameter.device == device:
                continue
            if id(parameter) not in moved:
                moved[id(parameter)] = nn.Parameter(parameter.data.to(device), parameter.requires_grad)
            module._parameters[name] = moved[id(parameter)]
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.device != device:
                module._buffers[name] = buffer.to(device)
    return model


def _padding_steps(model: nn.Module, task, batch: dict, steps: int):
    """A process with fewer batches than the others (the last round of the strided shard) must still take part in
    their layer all-gathers, or they wait forever: ``steps`` extra forward + head-mask-gradient passes over
    ``batch`` whose results are thrown away (called by the data-parallel reducer, after the pass and outside
    any recording)."""
    from .importance import frozen_parameters, full_head_mask

    def run() -> None:
        with frozen_parameters(model):
            for _ in range(steps):
                mask = full_head_mask(model).requires_grad_(True)
                torch.autograd.grad(task.evaluate(model, batch, head_mask=mask).loss, mask)
    return run


def join_patterns(run, importance: torch.Tensor) -> None:
    """On the processes other than rank 0: the forward pass that rank 0's attention patterns
    (:func:`fastbertology.commands.patterns_step`) make, on this process's first batch, so that every process
    takes part in the layers' all-gathers; the maps are thrown away."""
    from .attention_patterns import attention_patterns, choose_rows, extreme_heads

    batch = run.batches[0]
    heads = [(layer, head) for _, layer, head in extreme_heads(importance)]
    with torch.no_grad():
        attention_patterns(run.model, batch, heads, choose_rows(batch["attention_mask"], count=3, max_tokens=32),
                           max_tokens=32)


def loading_options(options):
    """The run options to set a ``--shard-model`` run up with: the model is loaded on the CPU and sharded onto
    the device afterwards (:func:`shard_run`)."""
    return dataclasses.replace(options, device="cpu")


def shard_run(run, device: torch.device, backend: str):
    """Shard ``run``'s model onto ``device`` (:func:`shard_model`) and move its batches there, after the processes
    have checked that they agree on the model and the data (:func:`fastbertology.distributed.shard_checked`)."""
    from .kernels import resolve_backend
    from .run_setup import device_name

    shard_model(run.model, device)
    run.batches = [move_batch(batch, device) for batch in run.batches]
    most = max(distributed.all_gather_objects(len(run.batches)))
    if len(run.batches) < most:
        run.model._fastbertology_padding_steps = _padding_steps(run.model, run.task, run.batches[0],
                                                                most - len(run.batches))
    run.device = device
    run.description["device"] = (f"{device_name(device)}; transformer layers sharded over "
                                 f"{distributed.world_size()} processes (FSDP2)")
    run.description["attention"] = (f"{resolve_backend(backend, device)} backend, padding-free (layers run on the real "
                                    "tokens only)")
    return run
