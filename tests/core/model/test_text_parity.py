"""The text tower on the real all-MiniLM-L6-v2 weights reproduces the references."""

import pytest
import torch

from core.model.text import default_text_path
from core.training.samples import varied_sentences

SENTENCES = varied_sentences(240, seed=7)


@pytest.fixture(scope="module")
def st_model():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(default_text_path()), device="cpu")


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoTokenizer, BertModel

    path = str(default_text_path())
    return AutoTokenizer.from_pretrained(path), BertModel.from_pretrained(path).eval()


def test_corpus_is_varied():
    words = [len(s.split()) for s in SENTENCES]
    assert len(SENTENCES) >= 200 and min(words) == 1 and max(words) >= 300
    assert any(ord(c) > 0x1F000 for s in SENTENCES for c in s)  # emoji
    assert any("\u3040" <= c <= "\u9fff" for s in SENTENCES for c in s)  # CJK


def test_embeddings_match_sentence_transformers(fp32_model, st_model):
    ours = fp32_model.embed("text", SENTENCES)  # (N, D)
    ref = st_model.encode(SENTENCES, batch_size=32, convert_to_tensor=True).cpu()
    assert ours.shape == ref.shape == (len(SENTENCES), 384)
    cos = torch.nn.functional.cosine_similarity(ours, ref, dim=-1)
    worst = int(cos.argmin())
    assert cos.min() >= 0.99999, f"cosine {cos.min():.7f} on {SENTENCES[worst][:80]!r}"
    diff = (ours - ref).abs().max(dim=-1).values
    assert diff.max() <= 1e-4, f"max abs diff {diff.max():.2e} on {SENTENCES[int(diff.argmax())]!r}"
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(SENTENCES)), atol=1e-5)


def test_embedding_independent_of_batch_company(model):
    """Packing must not leak between items: alone or in any batch, the same vector."""
    batch = model.embed("text", SENTENCES[:40])
    alone = torch.stack([model.embed("text", [s])[0] for s in SENTENCES[:40:7]])
    assert (batch[::7] - alone).abs().max() <= 1e-5


def test_token_ids_and_truncation_match_hf_tokenizer(model, hf):
    tok, _ = hf
    prepared = model.prepare_many("text", SENTENCES)
    for s, p in zip(SENTENCES, prepared, strict=True):
        full = tok(s.strip())["input_ids"]
        cut = tok(s.strip(), truncation=True, max_length=256)["input_ids"]
        assert p.ids == cut, s
        assert p.truncated == (len(full) > 256), s
    assert any(p.truncated for p in prepared) and not all(p.truncated for p in prepared)


def test_the_tokenizer_read_from_tokenizer_json_is_the_one_transformers_builds(hf, tmp_path):
    """Workers read tokenizer.json with ``tokenizers`` alone (no transformers import at
    start); a dir without one is converted by transformers. Both equal AutoTokenizer's."""
    import json
    import shutil

    from core.model.text import _rust_tokenizer

    def built(t) -> dict:  # truncation and padding are per call (an earlier test's)
        return {k: v for k, v in json.loads(t.to_str()).items()
                if k not in ("truncation", "padding")}

    tok, _ = hf
    assert built(_rust_tokenizer(default_text_path())) == built(tok.backend_tokenizer)
    for name in ("config.json", "vocab.txt", "tokenizer_config.json",
                 "special_tokens_map.json"):
        shutil.copy(default_text_path() / name, tmp_path / name)
    converted = _rust_tokenizer(tmp_path)  # only a vocabulary: through transformers
    assert [e.ids for e in converted.encode_batch(SENTENCES[:60])] == \
        [tok(s)["input_ids"] for s in SENTENCES[:60]]


def test_hidden_states_match_bert_model(fp32_model, hf):
    from core.model.attention import AttentionPlan

    tok, bert = hf
    prepared = fp32_model.prepare_many("text", SENTENCES)
    plan = AttentionPlan.from_lengths([p.tokens for p in prepared])
    ids = torch.tensor([t for p in prepared for t in p.ids])
    with torch.inference_mode():
        ours = fp32_model.text.hidden_states(ids, plan)  # (N, C)
        worst = 0.0
        for i in range(0, len(SENTENCES), 16):
            chunk = [s.strip() for s in SENTENCES[i:i + 16]]
            enc = tok(chunk, padding=True, truncation=True, max_length=256, return_tensors="pt")
            ref = bert(**enc).last_hidden_state  # (b, T, C)
            for j, p in enumerate(prepared[i:i + 16]):
                s = plan.cu_seqlens[i + j].item()
                err = (ours[s:s + p.tokens] - ref[j, :p.tokens]).abs().max().item()
                worst = max(worst, err)
                assert err <= 1e-4, f"hidden states differ by {err:.2e} on {chunk[j][:80]!r}"
    print(f"worst per-token hidden-state difference {worst:.2e}")
