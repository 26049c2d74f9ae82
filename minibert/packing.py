"""Packing: several short sequences share one row of length T, so no FLOPs go to padding.

Fine-tuning batches of short texts are mostly padding: an SST-2 sentence is ~13 tokens, so
padding every row to 128 spends ~90% of the encoder's work on [PAD]. Packing lays several
sequences end to end in one row and keeps them apart with three things:

    position_ids    restart at 0 for each sequence, so each one sees the positions it
                    would see alone;
    attention_mask  block-diagonal (R, T, T): query i may attend to key j only when both
                    belong to the same sequence, so no sequence sees its neighbours;
    doc_ids         (R, T) which sequence each token belongs to (1..k per row, 0 = padding).

With these the encoder computes, at every real token, exactly what it computes for the
sequence alone (tests/test_packing.py). Each sequence keeps its own [CLS]; `cls_index`
says where it landed, so `BertModel.pool(h, cls_index)` gathers the [CLS] states back in the
original order.

Shape letters: R packed rows, T row length, N sequences, H hidden size.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bin packing: assign items (by index) to as few bins of `capacity` as this heuristic finds.

    First-fit decreasing: take the items longest first and put each into the first (lowest
    numbered) bin that still has room, opening a new bin when none has. Long items are
    placed while bins are empty and the short ones fill the gaps; FFD never uses more than
    11/9 of the optimal number of bins (+6/9), and on many short texts it leaves well under
    1% padding.

    "The first bin with room" is found in O(log R) with a max segment tree over the bins'
    free space: each node holds the largest free space below it, so from the root we go
    left whenever the left subtree has a bin with room. Naive scanning would be O(N R),
    minutes on a 60k-sentence dataset; this is a fraction of a second.
    Returns bins as lists of item indices, each bin in the order its items were placed.
    """
    for i, n in enumerate(lengths):
        if not 0 < n <= capacity:
            raise ValueError(f"sequence {i} has length {n}; every length must be in 1..{capacity} (truncate first)")
    size = 1
    while size < max(1, len(lengths)):  # at most one bin per item
        size *= 2
    free = [0] * (2 * size)  # free[size + b] = room left in bin b; internal node = max of children
    opened = 0  # bins 0..opened-1 are in use; an unopened bin counts as full (0 free)
    bins: list[list[int]] = []
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep input order
    for i in order:
        n = lengths[i]
        if free[1] < n:  # no open bin has room: open the next one
            b = opened
            opened += 1
            bins.append([])
            room = capacity
        else:  # descend to the leftmost bin with room
            node = 1
            while node < size:
                node = 2 * node if free[2 * node] >= n else 2 * node + 1
            b = node - size
            room = free[node]
        bins[b].append(i)
        node = size + b
        free[node] = room - n
        node //= 2
        while node:  # refresh the maxima on the path to the root
            left, right = free[2 * node], free[2 * node + 1]
            free[node] = left if left >= right else right
            node //= 2
    return bins


def attention_mask_from_doc_ids(doc_ids: Tensor) -> Tensor:
    """(R, T) doc ids -> (R, T, T) bool keep-mask: token i may attend to token j iff same doc.

    Padding (doc 0) attends only to padding. Real tokens never see it, and no query row is
    left with nothing to attend to: every attention kernel then stays finite, including
    fused ones that return NaN for a fully masked row.
    """
    return doc_ids[:, :, None] == doc_ids[:, None, :]  # (R, T, T)


def pack(
    sequences: Sequence[Sequence[int]],
    seq_len: int,
    token_types: Optional[Sequence[Sequence[int]]] = None,
    pad_id: int = 0,
    labels: Optional[Sequence[Sequence[int]]] = None,
    dense_mask: bool = True,
) -> dict[str, Tensor]:
    """Pack sequences (each already [CLS] ... [SEP]) into rows of length seq_len.

    Returns a dict of tensors:
        input_ids, token_type_ids, position_ids, doc_ids   (R, T) long
        attention_mask                                     (R, T, T) bool, block-diagonal;
                                                           left out when dense_mask=False
        cls_index                                          (N, 2) long: (row, col) of each
                                                           sequence's first token, in input order
        labels                                             (R, T) long, only when labels are
                                                           given (per-token MLM labels), -100
                                                           at padding
    Give BertModel input_ids, token_type_ids, position_ids and either attention_mask or
    doc_ids: with doc_ids the model builds the mask its attention backend wants (a block
    mask for "flex", segment ids for the "triton" kernel) instead of a dense (R, T, T) one,
    and callers that do so pass dense_mask=False to skip building it.
    """
    for name, per_tok in (("token_types", token_types), ("labels", labels)):
        if per_tok is not None and [len(t) for t in per_tok] != [len(s) for s in sequences]:
            raise ValueError(f"{name} must have one entry per token of every sequence")
    bins = first_fit_decreasing([len(s) for s in sequences], seq_len)
    R, T = len(bins), seq_len
    # where each sequence goes: its row, its first column, its doc id within the row
    placed = []  # (sequence index, row, column, doc id), row by row, left to right
    for r, items in enumerate(bins):
        col = 0
        for k, i in enumerate(items, start=1):
            placed.append((i, r, col, k))
            col += len(sequences[i])
    order, rows, cols, docs = (list(v) for v in zip(*placed)) if placed else ([], [], [], [])
    # then every token at once (slicing a tensor per sequence takes seconds on 60k sequences)
    lengths = torch.tensor([len(sequences[i]) for i in order], dtype=torch.long)  # (N,)

    def per_token(values: list[int]) -> Tensor:
        return torch.repeat_interleave(torch.tensor(values, dtype=torch.long), lengths)  # (n_tokens,)

    within = torch.arange(int(lengths.sum())) - per_token((lengths.cumsum(0) - lengths).tolist())  # 0..n-1 per sequence
    slot = per_token(rows) * T + per_token(cols) + within  # (n_tokens,) flat index into R * T

    def scatter(values: Tensor, fill: int) -> Tensor:
        out = torch.full((R * T,), fill, dtype=torch.long)
        out[slot] = values
        return out.view(R, T)  # (R, T)

    input_ids = scatter(torch.tensor([t for i in order for t in sequences[i]], dtype=torch.long), pad_id)
    types = [t for i in order for t in token_types[i]] if token_types is not None else [0] * len(slot)
    token_type_ids = scatter(torch.tensor(types, dtype=torch.long), 0)
    position_ids = scatter(within, 0)  # each sequence starts again at position 0
    doc_ids = scatter(per_token(docs), 0)
    cls_index = torch.empty((len(sequences), 2), dtype=torch.long)
    cls_index[torch.tensor(order, dtype=torch.long)] = torch.tensor(list(zip(rows, cols)), dtype=torch.long).view(-1, 2)
    packed = {
        "input_ids": input_ids,
        "token_type_ids": token_type_ids,
        "position_ids": position_ids,
        "doc_ids": doc_ids,
        "cls_index": cls_index,
    }
    if dense_mask:
        packed["attention_mask"] = attention_mask_from_doc_ids(doc_ids)
    if labels is not None:
        packed["labels"] = scatter(torch.tensor([t for i in order for t in labels[i]], dtype=torch.long), -100)
    return packed
