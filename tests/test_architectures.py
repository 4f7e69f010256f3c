"""The architecture registry: every supported family resolves its layers, attention modules and head counts,
unknown families get an error naming the one entry to add, and no other module dispatches on model types."""

from __future__ import annotations

import re
from pathlib import Path

import families
import pytest
from models import LAYERS, MODEL_TYPES, tiny_model
from transformers import CamembertConfig, CamembertModel

import fastbertology
from fastbertology import architectures
from fastbertology.pruning import prune_heads

PACKAGE = Path(fastbertology.__file__).resolve().parent


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_every_family_resolves(model_type):
    model, layers, heads = tiny_model(model_type)
    entry = architectures.architecture(model)
    assert model_type in entry.model_types and architectures.architecture(model.config) is entry
    assert len(architectures.transformer_layers(model)) == layers == LAYERS
    modules = architectures.attention_modules(model)
    assert len(modules) == layers and len(set(map(id, modules))) == layers
    assert architectures.heads_per_layer(model) == [heads] * layers
    blocks = architectures.attention_blocks(model)
    assert all(module is block or any(child is module for child in block.modules())
               for module, block in zip(modules, blocks))  # the block owns the self-attention module
    assert entry.stacks[0].causal(model.config) == (model_type in ("gpt2", "openai-gpt"))
    assert entry.usable_positions(model.config) > 0
    prune_heads(model, {1: [0, 2]})
    assert architectures.heads_per_layer(model) == [heads, heads - 2, heads]


EXPECTED = {  # family -> (rows, key/value heads per row, parts, layer applications of the rows, causal)
    "albert": (4, 4, ["layers"] * 4, [0, 1, 2, 3], False),
    "bart": (6, 4, ["encoder"] * 2 + ["decoder"] * 2 + ["cross"] * 2, [0, 1, 2, 3, 2, 3], False),
    "falcon-mq": (3, 1, ["layers"] * 3, [0, 1, 2], True),
    "t5": (6, 4, ["encoder"] * 2 + ["decoder"] * 2 + ["cross"] * 2, [0, 1, 2, 3, 2, 3], False),
    "mt5": (6, 4, ["encoder"] * 2 + ["decoder"] * 2 + ["cross"] * 2, [0, 1, 2, 3, 2, 3], False),
    "gemma": (3, 1, ["layers"] * 3, [0, 1, 2], True),
    "vit": (3, 4, ["layers"] * 3, [0, 1, 2], False),
    "clip-text": (3, 4, ["layers"] * 3, [0, 1, 2], True),
    "clip": (3, 4, ["vision"] * 3, [0, 1, 2], False),  # (the image classifier has the vision tower only)
    "whisper": (6, 4, ["encoder"] * 2 + ["decoder"] * 2 + ["cross"] * 2, [0, 1, 2, 3, 2, 3], False),
    "whisper-audio": (3, 4, ["encoder"] * 3, [0, 1, 2], False),  # (the audio classifier has the encoder only)
}


@pytest.mark.parametrize("family", families.NAMES)
def test_every_issue_11_family_resolves(family):
    spec = families.FAMILIES[family]
    model = spec.model()
    entry = architectures.architecture(model)
    rows, kv_heads, parts, applications, causal = EXPECTED.get(
        family, (3, 2 if spec.gqa else 4, ["layers"] * 3, [0, 1, 2], spec.kind == "lm"))
    assert architectures.heads_per_layer(model) == [families.HEADS] * rows
    assert architectures.kv_heads_per_layer(model) == [kv_heads] * rows
    assert architectures.row_parts(model) == parts
    assert architectures.row_applications(model) == applications
    assert entry.stacks[0].causal(model.config) == causal
    outputs = spec.outputs(model)  # the oracle's output projections: each owned by its row's block
    for block, output in zip(architectures.attention_blocks(model), outputs):
        assert any(child is output for child in block.modules())
    assert len(architectures.transformer_layers(model)) == max(applications) + 1
    assert entry.model_classes["classification" if not spec.encoder_only else "encoder"]


def test_unknown_family_is_refused_with_the_entry_to_add():
    model = CamembertModel(CamembertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                           intermediate_size=48))
    for call in (architectures.architecture, architectures.heads_per_layer, fastbertology.patch):
        with pytest.raises(ValueError, match="'camembert'.*one Architecture entry in fastbertology/family_table.py"):
            call(model)


def test_only_the_registry_dispatches_on_model_types():
    """No module but the registry (architectures.py, its family table and architectures_more.py) compares
    ``model_type`` with a value or keys a table by family names."""
    names = "|".join(re.escape(name) for name in architectures.supported_model_types())
    dispatch = re.compile(rf"model_type\s*(==|!=|\bin\b|\bnot in\b)|[\"']({names})[\"']\s*:")
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name in ("architectures.py", "family_table.py", "architectures_more.py") or "bench" in path.parts:
            continue  # the benchmark builds models of named families on purpose
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if dispatch.search(line) and not line.lstrip().startswith("#"):
                offenders.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
