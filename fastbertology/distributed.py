"""Data-parallel runs under ``torchrun``: process group from the environment, data sharding, reductions.

Launched as ``torchrun --nproc-per-node N -m fastbertology <command> ...`` (``WORLD_SIZE`` > 1), every process
loads the model and all the data, checks that it agrees with the others (:func:`check_agreement`: parameter
count and a checksum of every byte, number of examples and a hash of the batches), keeps its shard of the batches
(:func:`shard`: batch i goes to rank ``i % world_size``), computes sums over its shard, and the sums are combined
(:func:`all_reduce_sum`, :func:`reduce_metric_state`). Rank 0 writes the outputs.

Backends: NCCL when the processes use CUDA devices (each process takes ``cuda:LOCAL_RANK``), gloo on CPU.

Metric states are combined with :func:`merge_metric_states`, which knows which entries are not plain sums:
the classification confusion matrix may have grown to different sizes (padded before adding), and the
regression state holds means and co-moments (merged with Chan et al.'s pairwise formula). Language-modelling
and retrieval states are sums. A task may define ``merge_metric_states(states) -> state`` itself.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist

from .tasks import count_examples, sum_metric_states

__all__ = [
    "init_from_env", "session", "is_distributed", "rank", "world_size", "is_main", "barrier", "shard",
    "all_reduce_sum", "all_gather_objects", "broadcast_object", "merge_metric_states", "reduce_metric_state",
    "analysis_reducer", "sweep_reducer", "model_fingerprint", "data_fingerprint", "check_agreement",
    "DistributedMismatchError", "shard_checked", "env_world_size",
]


class DistributedMismatchError(RuntimeError):
    """The processes of a data-parallel run do not have the same model or data."""


# --------------------------------------------------------------------------------------------------------------
# Process group
# --------------------------------------------------------------------------------------------------------------
def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(*, device: str | None = None, backend: str | None = None) -> bool:
    """Initialise the default process group from torchrun's environment (``WORLD_SIZE``, ``RANK``,
    ``MASTER_ADDR``...) when ``WORLD_SIZE`` > 1 and it is not initialised yet. Returns True if it initialised it.

    backend: default NCCL when CUDA is available and ``device`` is not ``"cpu"``, else gloo (override with
    ``FASTBERTOLOGY_DIST_BACKEND``). With NCCL the process's CUDA device is set to ``LOCAL_RANK``.
    """
    if env_world_size() <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    uses_cuda = torch.cuda.is_available() and not str(device or "auto").startswith("cpu")
    backend = backend or os.environ.get("FASTBERTOLOGY_DIST_BACKEND") or ("nccl" if uses_cuda else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True


@contextlib.contextmanager
def session(*, device: str | None = None):
    """Initialise from the environment if needed (see :func:`init_from_env`) and yield whether the run is
    distributed. The process group is kept for the life of the process and destroyed at exit: destroying and
    re-initialising it within one torchrun worker races with the other workers (gloo "connection reset")."""
    if init_from_env(device=device):
        atexit.register(_destroy_at_exit)
    yield is_distributed()


def _destroy_at_exit():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True in a single-process run and on rank 0."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shard(items: Sequence, *, rank_: int | None = None, world: int | None = None) -> list:
    """This process's share of ``items``: item i belongs to rank ``i % world`` (strided, deterministic)."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    if not 0 <= rank_ < world:
        raise ValueError(f"rank {rank_} is outside a world of {world}")
    return list(items)[rank_::world]


# --------------------------------------------------------------------------------------------------------------
# Collectives
# --------------------------------------------------------------------------------------------------------------
def _collective_device(tensor: torch.Tensor) -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu") if tensor.device.type == "cuda" else tensor.device


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over all processes (a new tensor with the input's device and dtype; the input itself
    when not distributed). Summed in float64."""
    if not is_distributed():
        return tensor
    work = tensor.detach().to(device=_collective_device(tensor), dtype=torch.float64).clone()
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.to(device=tensor.device, dtype=tensor.dtype)


def all_reduce_sums(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """:func:`all_reduce_sum` of several tensors in one collective."""
    if not is_distributed() or not tensors:
        return list(tensors)
    device = _collective_device(tensors[0])
    flat = torch.cat([t.detach().reshape(-1).to(device=device, dtype=torch.float64) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    out, offset = [], 0
    for t in tensors:
        out.append(flat[offset:offset + t.numel()].view(t.shape).to(device=t.device, dtype=t.dtype))
        offset += t.numel()
    return out


def all_gather_objects(value) -> list:
    """Every process's ``value`` (picklable), in rank order; ``[value]`` when not distributed."""
    if not is_distributed():
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_object(value, *, src: int = 0):
    """Rank ``src``'s ``value`` on every process."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# --------------------------------------------------------------------------------------------------------------
# Metric states
# --------------------------------------------------------------------------------------------------------------
def merge_metric_states(task, states: list[dict]) -> dict:
    """Combine metric states accumulated on disjoint data (in the given order) into one, as if accumulated on all
    of it: the task's own ``merge_metric_states`` (entry-wise sums for a task object without one)."""
    if not states:
        raise ValueError("no metric states to merge")
    merge = getattr(task, "merge_metric_states", None)
    return merge(states) if merge is not None else sum_metric_states(states)


def reduce_metric_state(task, state: dict) -> dict:
    """The metric state over all processes' data (every process gets the same)."""
    if not is_distributed():
        return state
    return merge_metric_states(task, all_gather_objects(_cpu_state(state)))


def _cpu_state(state: dict) -> dict:
    return {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


# --------------------------------------------------------------------------------------------------------------
# Reducers for the analyses
# --------------------------------------------------------------------------------------------------------------
def analysis_reducer(model, task):
    """A ``reduce=`` callable for :func:`fastbertology.importance.analyze_heads` that sums importance, entropy and
    max-probability sums, token counts, losses and the metric state over all processes; None when not
    distributed."""
    if not is_distributed():
        return None
    from .architectures import heads_per_layer

    heads = heads_per_layer(model)

    def reduce(totals: dict) -> dict:
        padding = getattr(model, "_fastbertology_padding_steps", None)  # set by model_sharding.shard_run
        if padding is not None:
            padding()  # a sharded model: processes with fewer batches join the others' last layer all-gathers
        counts = torch.tensor([float(totals["loss_sum"]), float(totals["batches"]), float(totals["examples"])],
                              dtype=torch.float64)
        raw, counts = all_reduce_sums([totals["raw_importance"], counts])
        totals["raw_importance"] = raw
        totals["loss_sum"] = float(counts[0])
        totals["batches"] = int(round(float(counts[1])))
        totals["examples"] = int(round(float(counts[2])))
        totals["statistics"].reduce(all_reduce_sums, heads)
        totals["metric_state"] = reduce_metric_state(task, totals["metric_state"])
        return totals

    return reduce


def sweep_reducer(task):
    """A ``reduce=`` callable for :func:`fastbertology.sweeps.evaluate_masks` that merges every process's
    :class:`~fastbertology.sweeps.SweepState` (per-mask metric states and loss sums, in rank order); None when
    not distributed."""
    if not is_distributed():
        return None
    from .sweeps import SweepState

    def reduce(state):
        local = SweepState(state.steps_done, [_cpu_state(s) for s in state.states], list(state.loss_sums),
                           _cpu_state(state.baseline_state), state.baseline_loss_sum, state.batches)
        everyone = all_gather_objects(local)
        return SweepState(
            steps_done=state.steps_done,
            states=[merge_metric_states(task, [p.states[m] for p in everyone]) for m in range(len(state.states))],
            loss_sums=[sum(p.loss_sums[m] for p in everyone) for m in range(len(state.states))],
            baseline_state=merge_metric_states(task, [p.baseline_state for p in everyone]),
            baseline_loss_sum=sum(p.baseline_loss_sum for p in everyone),
            batches=sum(p.batches for p in everyone),
        )

    return reduce


# --------------------------------------------------------------------------------------------------------------
# Agreement between processes
# --------------------------------------------------------------------------------------------------------------
_CONFIG_KEYS_IGNORED = ("_name_or_path", "name_or_path", "transformers_version", "_commit_hash",
                        "_attn_implementation_autoset", "_attn_implementation_internal")


def _config_digest(config) -> str:
    """SHA-256 of the model config's values (everything that shapes the computation; not where it was loaded
    from or which transformers version saved it)."""
    if config is None:
        return ""
    values = {k: v for k, v in json.loads(config.to_json_string(use_diff=False)).items()
              if k not in _CONFIG_KEYS_IGNORED}
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()


def model_fingerprint(model) -> dict:
    """Parameter count and a checksum: SHA-256 over the config's values and every parameter's and buffer's name,
    shape, dtype and **every byte** of its values (hashing is cheap next to a forward pass over the data), so
    that two models that differ in any value never share a fingerprint."""
    digest = hashlib.sha256()
    digest.update(_config_digest(getattr(model, "config", None)).encode())
    count = 0
    tensors = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, tensor in tensors:
        cpu = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(cpu.shape)}:{cpu.dtype};".encode())
        digest.update(cpu.reshape(-1).view(torch.uint8).numpy().data)
    for _, parameter in model.named_parameters():
        count += parameter.numel()
    return {"model_type": getattr(getattr(model, "config", None), "model_type", None), "parameters": count,
            "checksum": digest.hexdigest()[:32]}


def data_fingerprint(batches: Sequence[dict]) -> dict:
    """Number of batches and examples and a SHA-256 of every batch's tensors (keys, dtypes, shapes, values)."""
    digest = hashlib.sha256()
    examples = 0
    for batch in batches:
        for key in sorted(batch):
            value = batch[key]
            if isinstance(value, torch.Tensor):
                cpu = value.detach().cpu().contiguous()
                digest.update(f"{key}:{cpu.dtype}:{tuple(cpu.shape)};".encode())
                digest.update(cpu.reshape(-1).view(torch.uint8).numpy().tobytes())
        examples += count_examples(batch) or 0
    return {"batches": len(batches), "examples": examples, "checksum": digest.hexdigest()[:20]}


def check_agreement(model, batches: Sequence[dict]) -> dict:
    """Fingerprints of the model and the (whole, unsharded) data; in a distributed run, raise
    :class:`DistributedMismatchError` on every process if any process differs from rank 0."""
    mine = {"model": model_fingerprint(model), "data": data_fingerprint(batches)}
    everyone = all_gather_objects(mine)
    problems = []
    for other_rank, other in enumerate(everyone[1:], start=1):
        for what in ("model", "data"):
            if other[what] != everyone[0][what]:
                problems.append(f"rank {other_rank} has {what} {other[what]} but rank 0 has {everyone[0][what]}")
    if problems:
        raise DistributedMismatchError(
            "the processes of this distributed run disagree (every process must load the same model and read the "
            "same data with the same options): " + "; ".join(problems))
    return mine


def shard_checked(model, batches: Sequence[dict]) -> list:
    """In a distributed run: :func:`check_agreement` on the whole data, then this process's :func:`shard`. The
    batches unchanged otherwise."""
    if not is_distributed():
        return list(batches)
    check_agreement(model, batches)
    return shard(batches)
