"""Retrieval with sentence embeddings (MiniLM): :class:`RetrievalTask`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Task, TaskResult, _at_least_float32, _mask_kwargs, _model_inputs


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden [B, N, D]`` over the non-padding tokens of ``attention_mask [B, N]`` -> ``[B, D]``
    (sentence-transformers' mean pooling)."""
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)  # [B, N, 1]
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def embed(model, batch: dict, *, prefix: str = "", head_mask: torch.Tensor | None = None) -> torch.Tensor:
    """L2-normalised mean-pooled sentence embeddings ``[B, D]`` (float32 or wider) of the ``prefix`` inputs of
    ``batch`` (``""``: ``input_ids``...; ``"pair_"``: ``pair_input_ids``...). Runs the base model (a model with a
    head is reduced to ``model.base_model``); ``head_mask`` as for the patched model."""
    inputs = _model_inputs(batch, prefix)
    encoder = getattr(model, "base_model", model)
    output = encoder(**inputs, **_mask_kwargs(head_mask))
    hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]  # [B, N, D]
    pooled = mean_pool(_at_least_float32(hidden), inputs["attention_mask"].to(hidden.device))
    return F.normalize(pooled, dim=-1)


def retrieval_ranks(similarity: torch.Tensor) -> torch.Tensor:
    """``similarity [g, g]`` (row i: query i against every positive) -> ``[g]`` rank of the own positive (the
    diagonal), 1 = best. Ties count against the query: rank = 1 + #{j != i : s_ij >= s_ii}, so a model whose
    embeddings collapse to one point scores 0, not 1."""
    own = similarity.diagonal().unsqueeze(1)  # [g, 1]
    beaten = (similarity >= own).sum(1) - 1  # the diagonal itself always counts once
    return beaten + 1


class RetrievalTask(Task):
    """In-batch-negatives retrieval for sentence-embedding models such as all-MiniLM-L6-v2.

    Each example is a (query, positive) pair, batched with ``make_batches(..., pair_mode="separate")``: queries
    in ``input_ids``/``attention_mask``(/``token_type_ids``), positives in ``pair_input_ids``... Both are embedded
    by the base model with mean pooling over non-padding tokens and L2 normalisation (:func:`embed`).

    Fixed groups (batch-size independence): the examples are cut, in data order, into groups of ``group_size``
    (G, default 32): example k belongs to group ``k // G`` (from ``batch["example_index"]``; without it, from the
    position in the batch). Within a group, S = ``scale`` * cos(query_i, positive_j) ``[g, g]``;

    * loss: symmetric cross-entropy with the own positive as the target, as sentence-transformers'
      MultipleNegativesSymmetricRankingLoss with scale 20: ``example_losses[i] = (CE(S[i, :], i) + CE(S[:, i], i))
      / 2``; ``loss`` = mean of ``example_losses`` over the batch;
    * metric: ``"accuracy@1"`` (main) and ``"mrr"`` of each query's own positive among the group's positives
      (ties count against it, see :func:`retrieval_ranks`); also ``"chance@1"``, the score of random ranking
      (mean of 1/g), and ``"examples"``.

    Because a group's members are always the same examples, every example's loss and rank — hence the metric and
    the mean loss over the data — are the same for any batch size that is a multiple of G (use
    ``batch_size = k * G``). A batch must therefore start at a group boundary and hold whole groups (the last
    group of the data may be smaller); with ``example_index`` this is checked and a ValueError names the fix.
    ``group_size=None`` uses the whole batch as the group: the standard in-batch objective, which depends on the
    batch size and composition.

    With a per-example head mask ``[B, L, H]`` the query and the positive of example b share row b. Note that in
    this loss examples interact: example i's positive is a negative for the other queries of its group.
    """

    name = "retrieval"
    metric_name = "accuracy@1"
    higher_is_better = True
    cuda_graph_refusal = "it embeds two inputs per example (two packed calls per step)"

    def __init__(self, *, group_size: int | None = 32, scale: float = 20.0, symmetric: bool = True):
        if group_size is not None and group_size < 2:
            raise ValueError(f"group_size must be at least 2 (or None for the whole batch), got {group_size}")
        self.group_size = group_size
        self.scale = float(scale)
        self.symmetric = symmetric

    def __repr__(self) -> str:
        return f"RetrievalTask(group_size={self.group_size}, scale={self.scale}, symmetric={self.symmetric})"

    def forward(self, model, batch, *, head_mask=None):
        if "pair_input_ids" not in batch:
            raise ValueError("RetrievalTask needs query and positive inputs: make the batches with "
                             "make_batches(..., pair_mode='separate')")
        return embed(model, batch, head_mask=head_mask), embed(model, batch, prefix="pair_", head_mask=head_mask)

    def split(self, output, k):
        """``(queries [k*B, D], positives [k*B, D])`` -> k pairs ``([B, D], [B, D])``. (The replicated batch tiles
        ``example_index`` as is, so it is not a valid retrieval batch itself: results are computed per copy on the
        original batch, which keeps copy j's fixed groups exactly the original groups.)"""
        queries, positives = output
        if queries.shape[0] % k or positives.shape[0] != queries.shape[0]:
            raise ValueError(f"retrieval output of {queries.shape[0]} queries / {positives.shape[0]} positives "
                             f"cannot be split into {k} copies")
        return list(zip(queries.chunk(k, dim=0), positives.chunk(k, dim=0)))

    def groups(self, batch: dict, size: int) -> list[slice]:
        """Contiguous slices of the batch that form the fixed groups (see the class docstring)."""
        if self.group_size is None:
            return [slice(0, size)]
        g = self.group_size
        if "example_index" in batch:
            index = batch["example_index"].detach().cpu()  # kept on the host by move_batch: no sync
            first = int(index[0])
            if first % g or not torch.equal(index, torch.arange(first, first + size)):
                raise ValueError(
                    f"retrieval groups of {g} examples must not be split across batches: this batch starts at example "
                    f"{first}. Use a batch size that is a multiple of group_size ({g}) and keep the data order")
        return [slice(start, min(start + g, size)) for start in range(0, size, g)]

    def result(self, output, batch):
        queries, positives = output  # [B, D] each, L2-normalised
        size = len(queries)
        losses, ranks, group_sizes = [], [], []
        for group in self.groups(batch, size):
            q, p = queries[group], positives[group]  # [g, D]
            cosine = q @ p.T  # [g, g]
            logits = self.scale * cosine
            target = torch.arange(len(q), device=q.device)
            loss = F.cross_entropy(logits, target, reduction="none")
            if self.symmetric:
                loss = (loss + F.cross_entropy(logits.T, target, reduction="none")) / 2
            losses.append(loss)
            ranks.append(retrieval_ranks(cosine.detach()))
            group_sizes.append(torch.full((len(q),), len(q), device=q.device))
        example_losses = torch.cat(losses)
        return TaskResult(loss=example_losses.mean(), example_losses=example_losses, ranks=torch.cat(ranks),
                          group_sizes=torch.cat(group_sizes), embeddings=queries, pair_embeddings=positives)

    def metric_state(self):
        return {"hits": 0, "reciprocal_rank": 0.0, "chance": 0.0, "examples": 0}

    def update_metric(self, state, result, batch):
        """Sums on the device (0-d tensors after the first batch; the example count a host int): no sync."""
        ranks = result.ranks.detach().double()
        state["hits"] = state["hits"] + (ranks == 1).sum()
        state["reciprocal_rank"] = state["reciprocal_rank"] + ranks.reciprocal().sum()
        state["chance"] = state["chance"] + result.group_sizes.detach().double().reciprocal().sum()
        state["examples"] += len(ranks)

    def compute_metrics(self, state):
        state = {key: value if key == "examples" else float(value) for key, value in state.items()}
        n = state["examples"]
        if n == 0:
            raise ValueError("no examples were accumulated: the metric is undefined")
        return {"accuracy@1": state["hits"] / n, "mrr": state["reciprocal_rank"] / n, "chance@1": state["chance"] / n,
                "examples": float(n)}
