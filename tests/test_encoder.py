"""The frozen encoder read without transformers (redheart/model/bert.py) against transformers'
own tokenizer and BertModel on the real all-MiniLM-L6-v2: the same token ids and the same
token states, so the features every run trains on are the ones transformers would give."""
from __future__ import annotations

import gzip
import json
import shutil

import pytest
import torch

from helpers import SAMPLE, SHARED_DATA
from redheart.model import bert
from redheart.model.encoder import DEFAULT_ENCODER, Encoder, EncoderError, Tokenizer, encoder_dir

EDGE_TEXTS = [
    "", " ", "Hello world!", "AITA for telling my sister\tno?\n\nShe was upset.",
    "나는 친구에게 차를 빌려줬는데 그가 사고를 냈다.", "Café naïve résumé 中文字符 🙂 ÅNGSTRÖM",
    "don't   won't\u00a0can't\u200bzero-width", "word " * 400, "[CLS] [SEP] [PAD] [MASK] [UNK]",
]


def corpus_texts() -> list[str]:
    texts = [json.loads(line)["text"] for line in SAMPLE.read_text().splitlines() if line.strip()]
    for name in ("goemotions_ko_dev.tsv.gz", "goemotions_en_dev.tsv.gz"):  # Korean and English comments
        if (SHARED_DATA / name).is_file():
            with gzip.open(SHARED_DATA / name, "rt", encoding="utf-8") as f:
                texts += [line.split("\t", 1)[0] for _, line in zip(range(200), f)]
    if (SHARED_DATA / "scruples_anecdotes.jsonl.gz").is_file():  # long posts: truncation
        with gzip.open(SHARED_DATA / "scruples_anecdotes.jsonl.gz", "rt", encoding="utf-8") as f:
            texts += [json.loads(line)["text"] for _, line in zip(range(40), f)]
    return EDGE_TEXTS + texts


@pytest.fixture(scope="module")
def encoders():
    # fp32 both (transformers keeps a half-precision checkpoint's dtype; training casts anyway)
    return Encoder(DEFAULT_ENCODER).float(), Encoder(DEFAULT_ENCODER, native=False).float()


@pytest.mark.parametrize("max_tokens", [8, 128, 256])
def test_token_ids_equal_transformers(max_tokens):
    texts = corpus_texts()
    native, reference = Tokenizer(DEFAULT_ENCODER, max_tokens), Tokenizer(DEFAULT_ENCODER, max_tokens, native=False)
    assert native.native and not reference.native
    got, want = native(texts), reference(texts)
    differ = [t[:60] for t, a, b in zip(texts, got, want) if a != b]
    assert not differ, differ[:5]
    assert native.pad_id == reference.pad_id == 0
    assert max(map(len, got)) == max_tokens  # the long texts were truncated, [SEP] kept
    assert all(ids[0] == want[0][0] and ids[-1] == want[0][-1] for ids in got)


def test_token_states_equal_transformers_bert(encoders):
    native, reference = encoders
    assert native.native and not reference.native and native.dim == reference.dim == 384
    tok = Tokenizer(DEFAULT_ENCODER, 128)
    ids = tok(corpus_texts()[:48])
    n = max(map(len, ids))
    batch = torch.tensor([x + [0] * (n - len(x)) for x in ids])
    keep = batch != 0
    keep[:, 0] = True
    got, want = native(batch, keep), reference(batch, keep)
    assert got.shape == want.shape == (len(ids), n, 384)
    err = float(((got - want).abs() * keep[..., None]).max())
    assert err < 1e-4 * float(want.abs().max()), err
    # a padded text's states are its unpadded states: the mask is honoured
    alone = native(batch[:1, : len(ids[0])], keep[:1, : len(ids[0])])
    assert torch.allclose(alone[0], got[0, : len(ids[0])], atol=1e-5)


def test_other_encoders_go_through_transformers(tmp_path):
    """An encoder this module does not run exactly (RoBERTa's offset positions, another
    activation) goes through transformers' AutoModel; a BERT whose weights file lacks a layer
    is a clear error naming what is missing."""
    src = encoder_dir(DEFAULT_ENCODER)
    assert bert.supports(src)
    cfg = json.loads((src / "config.json").read_text())
    for name, change in {"roberta": {"model_type": "roberta"}, "gelu_new": {"hidden_act": "gelu_new"}}.items():
        shutil.copytree(src, tmp_path / name)
        (tmp_path / name / "config.json").write_text(json.dumps({**cfg, **change}))
        assert not bert.supports(tmp_path / name)
    other = Encoder(str(tmp_path / "gelu_new"))
    assert not other.native and other.dim == 384
    ids = torch.tensor([[101, 7592, 2088, 102]])
    assert other(ids, ids > 0).shape == (1, 4, 384)

    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    from safetensors.torch import load_file, save_file

    weights = load_file(str(broken / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if ".layer.5." not in k}, str(broken / "model.safetensors"))
    with pytest.raises(EncoderError, match=r"lacks 16 weights of a BERT encoder.*layer\.5\."):
        Encoder(str(broken))
