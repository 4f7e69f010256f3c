"""Reading the weights of a ``save_pretrained`` checkpoint into an already pruned model (for
:func:`fastbertology.pruning.load_pruned`).

``save_pretrained`` writes some families in an older layout than the one their modules hold: legacy names
(GPT-NeoX's ``embed_out``) and, for mixture-of-experts models such as Mixtral, one tensor per expert where the model
holds all experts stacked. Loading applies transformers' own conversions for the model (renamings, and merges of
tensors that are no attention projection); a conversion that would produce an attention projection's weights is
refused, because those tensors are cut by head and a merge or split of them cannot be trusted to follow the cut.
"""

from __future__ import annotations

import copy
import json
import os

import torch
from torch import nn

from .architectures import attention_sites

__all__ = ["read_safetensors", "load_state"]

_WEIGHTS_NAME = "model.safetensors"
_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """The state dict in ``path/model.safetensors`` or in the shards listed by ``model.safetensors.index.json``."""
    from safetensors.torch import load_file

    single = os.path.join(path, _WEIGHTS_NAME)
    index = os.path.join(path, _WEIGHTS_INDEX_NAME)
    if os.path.isfile(single):
        return load_file(single)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(os.path.join(path, shard)))
        return state
    raise FileNotFoundError(f"No {_WEIGHTS_NAME} or {_WEIGHTS_INDEX_NAME} in {path} (only safetensors are loaded).")


def _attention_parameter_names(model: nn.Module) -> set[str]:
    """The state-dict names of every parameter of the attention blocks (what pruning cuts by head)."""
    blocks = {id(site.block) for site in attention_sites(model)}
    return {f"{prefix}.{name}" for prefix, module in model.named_modules() if id(module) in blocks
            for name, _ in module.named_parameters()}


def _renamed_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint tensors under the model's parameter names, after the renamings and weight conversions
    transformers applies when it loads the model. ValueError for a conversion that produces attention weights."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    by_pattern = {pattern: converter for converter in converters for pattern in converter.source_patterns}
    expected = model.state_dict()
    renamed, pending, sources = {}, {}, {}
    for key, tensor in state.items():
        name, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, expected)
        if pattern is None:
            renamed[name] = tensor
            continue
        converter = pending.setdefault(name, copy.deepcopy(by_pattern[pattern]))  # one per converted tensor
        converter.add_tensor(name, key, pattern, tensor)
        sources.setdefault(name, key)
    attention = _attention_parameter_names(model)
    for name, converter in pending.items():
        for target, tensor in converter.convert(name, model=model, config=model.config).items():
            if target in attention:
                raise ValueError(f"the checkpoint's {sources[name]} needs a weight conversion into the attention "
                                 f"weight {target}, which load_pruned does not do (those weights are cut by head); "
                                 "load the unpruned model with from_pretrained and prune it again")
            renamed[target] = tensor[0] if isinstance(tensor, list) else tensor
    return renamed


def load_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """``load_state_dict`` (after transformers' renamings and conversions) that tolerates only missing keys
    aliasing a loaded tensor (tied weights)."""
    state = _renamed_state(model, state)
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"The checkpoint has weights the pruned model does not: {sorted(result.unexpected_keys)}")
    tensors = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    loaded = {id(tensors[name]) for name in state if name in tensors}
    missing = [name for name in result.missing_keys if id(tensors.get(name)) not in loaded]
    if missing:
        raise ValueError(f"The checkpoint lacks weights of the model: {sorted(missing)}")
