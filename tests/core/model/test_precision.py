"""Precision modes of the text tower on the real all-MiniLM-L6-v2 weights: bf16 keeps
every embedding within cosine 0.999 of fp32 and zero-shot top-1 unchanged on >= 99% of
a labelled sample; the mode is tagged in the version and resolved by device."""

import pytest
import torch
import torch.nn.functional as F

from core.config import Settings
from core.model import precision as P
from core.precision import tagged, untagged
from core.training.samples import varied_sentences
from tests import helpers

SENTENCES = varied_sentences(240, seed=7)
TOPICS = {
    "sport": ["The striker scored twice in the second half", "She won the marathon in record "
              "time", "The match went to extra time and penalties", "Our team lost the final"],
    "finance": ["Shares fell after the bank raised interest rates", "The company reported "
                "record quarterly profits", "Inflation eroded savings this year",
                "Investors sold their bonds"],
    "weather": ["Heavy rain and strong winds are expected tomorrow", "It will be sunny and "
                "warm all weekend", "Snow closed the mountain roads", "A heatwave is coming"],
    "cooking": ["Simmer the onions in butter until golden", "Bake the bread for forty "
                "minutes", "Add a pinch of salt to the sauce", "She chopped the garlic finely"],
    "technology": ["The new phone has a faster processor", "Update the software to fix the "
                   "security bug", "The laptop needs more memory for the new apps", "He wrote a "
                   "Python script to parse the logs"],
}
LABELS = list(TOPICS)


def labelled() -> tuple[list[str], list[int]]:
    texts = [t for ts in TOPICS.values() for t in ts]
    truth = [i for i, ts in enumerate(TOPICS.values()) for _ in ts]
    return texts, truth


needs_bf16 = helpers.needs_bf16()


@pytest.fixture(scope="module")
def bf16_model():
    from core.model.multimodal import MultimodalModel

    return MultimodalModel.load(device="cpu", settings=Settings(text_precision="bf16",
                                                                image_precision="fp32"))


def top1(model, texts: list[str]) -> list[str]:
    return [r[0][0] for r in model.classify("text", texts, LABELS, top_k=1)]


@needs_bf16
def test_bf16_embeddings_within_cosine_0999_of_fp32(fp32_model, bf16_model):
    ref = fp32_model.embed("text", SENTENCES)  # (N, D) fp32
    got = bf16_model.embed("text", SENTENCES)  # (N, D)
    cos = F.cosine_similarity(got, ref, dim=-1)
    worst = int(cos.argmin())
    assert cos.min() >= 0.999, f"cosine {cos.min():.5f} on {SENTENCES[worst][:80]!r}"
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(SENTENCES)), atol=1e-5)
    assert bf16_model.text.encoder.layers[0].fc1.weight.dtype == torch.bfloat16


@needs_bf16
def test_bf16_classification_top1_unchanged(fp32_model, bf16_model):
    texts, truth = labelled()
    texts = texts + SENTENCES  # the topical sample and 240 varied sentences, near-ties too
    ref, got = top1(fp32_model, texts), top1(bf16_model, texts)
    same = sum(a == b for a, b in zip(ref, got, strict=True)) / len(texts)
    assert same >= 0.99, f"top-1 unchanged on {same:.1%}"
    right = sum(LABELS[t] == g for t, g in zip(truth, got, strict=False)) / len(truth)
    assert right >= 0.9  # the topical sample is labelled, and mostly right


@needs_bf16
def test_version_is_tagged_and_search_space_is_not(fp32_model, bf16_model):
    text, rest = bf16_model.version.split("+", 1)
    assert text == tagged(fp32_model.version.split("+", 1)[0], "bf16") and text.endswith("/bf16")
    assert rest == fp32_model.version.split("+", 1)[1]  # image and speech towers untouched
    # (the speech part carries its own mode's tag, the same in both: Settings' default)
    assert untagged(bf16_model.version) == untagged(fp32_model.version)


def test_int8_runs_tagged_but_is_below_the_bf16_bound():
    """int8 (dynamic quantization) is opt-in: faster on VNNI CPUs, but per-tensor
    activation scales cost accuracy (docs/model.md). Pinned so a change shows."""
    from core.model.multimodal import MultimodalModel

    ref = MultimodalModel.load(device="cpu")
    m = MultimodalModel.load(device="cpu", settings=Settings(text_precision="int8"))
    assert m.version.split("+")[0].endswith("/int8")
    cos = F.cosine_similarity(m.embed("text", SENTENCES[:80]), ref.embed("text", SENTENCES[:80]))
    assert cos.mean() >= 0.95


def test_resolve_by_device_and_cpu_flags(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(P, "_cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert P.resolve_precision("auto", cpu) == "bf16"  # native: faster than fp32 there
    monkeypatch.setattr(P, "_cpu_flags", lambda: {"avx512f", "avx512_vnni"})
    assert P.resolve_precision("auto", cpu) == "fp32"  # emulated bf16 is slower than fp32
    monkeypatch.setattr(P, "ONEDNN_BF16", True)
    assert P.resolve_precision("bf16", cpu) == "bf16"  # an explicit choice is kept
    monkeypatch.setattr(P, "_cpu_flags", lambda: {"avx2", "fma"})
    monkeypatch.setattr(P, "ONEDNN_BF16", False)  # no bf16 kernels at all: fp32, warned
    assert P.resolve_precision("bf16", cpu) == "fp32"
    assert P.resolve_precision("auto", cpu) == "fp32"
    with pytest.raises(ValueError, match="CPU only"):
        P.resolve_precision("int8", torch.device("cuda"))
    with pytest.raises(ValueError, match="unknown precision"):
        P.resolve_precision("fp8", cpu)


def test_bad_setting_is_refused():
    with pytest.raises(ValueError, match="text_precision"):
        Settings(text_precision="half")


def test_version_tags():
    v = "m@abc+image@e@1+zs@2+speech@3"
    assert tagged("m@abc", "fp32") == "m@abc"  # fp32: the versions stored before modes
    assert untagged(v.replace("m@abc", "m@abc/bf16")) == v
    assert untagged("m@abc/int8") == "m@abc" and untagged("m@a/bf16x") == "m@a/bf16x"


def test_bf16_without_onednn_bf16_kernels_takes_the_plain_path(monkeypatch):
    """On an AVX2-only CPU oneDNN has no bf16 kernels: its fused linear raises ("could
    not create a primitive descriptor"; every bf16 forward failed there before) while
    a plain bf16 F.linear runs. Such a CPU is simulated here, so the guard is checked on
    any machine."""
    from torch import nn

    from core.model import fused

    def no_bf16(x, *args, **kwargs):
        if x.dtype == torch.bfloat16:
            raise RuntimeError("could not create a primitive descriptor")
        return fused._onednn_linear_pointwise()(x, *args, **kwargs)

    monkeypatch.setattr(fused, "ONEDNN_BF16", False, raising=False)
    if fused.LINEAR_POINTWISE is not None:
        monkeypatch.setattr(fused, "LINEAR_POINTWISE", no_bf16)
    lin = nn.Linear(64, 96)
    x = torch.randn(10, 64)  # (N, C)
    with torch.inference_mode():
        ref = F.gelu(lin(x))  # (N, 96) fp32
        got = fused.linear(x, lin, torch.bfloat16, act="gelu")  # (N, 96) bf16
    assert got.dtype == torch.bfloat16
    assert torch.allclose(got.float(), ref, atol=0.05, rtol=0.02)


@needs_bf16
def test_a_packed_bf16_weight_gives_the_same_outputs_and_is_never_served_stale():
    """bf16 linears keep their weight in oneDNN's blocked layout (``fused.pack``): the
    same outputs bit for bit at any row count, through every fused helper; a weight
    replaced or written after packing is used as it is now, not the stale copy."""
    from torch import nn

    from core.model import fused

    torch.manual_seed(0)
    lin = nn.Linear(64, 96).to(torch.bfloat16)
    plain = nn.Linear(64, 96).to(torch.bfloat16)
    plain.load_state_dict(lin.state_dict())
    fused.pack(lin, 2048)
    assert fused.packed_weight(lin) is not lin.weight
    for n in (1, 7, 300):
        x = torch.randn(n, 64).bfloat16()  # (n, 64)
        res = torch.randn(n, 96)  # (n, 96) an fp32 residual stream
        with torch.inference_mode():
            assert torch.equal(fused.plain_linear(x, lin), fused.plain_linear(x, plain))
            assert torch.equal(fused.linear_gelu(x, lin), fused.linear_gelu(x, plain))
            assert torch.equal(fused.linear_add(x, lin, res), fused.linear_add(x, plain, res))
    x = torch.randn(5, 64).bfloat16()
    with torch.no_grad():
        lin.weight.mul_(2)  # written in place after packing
    assert fused.packed_weight(lin) is lin.weight
    with torch.inference_mode():
        assert torch.allclose(fused.plain_linear(x, lin).float(), F.linear(
            x, lin.weight, lin.bias).float(), atol=1e-2)
    lin.weight = nn.Parameter(torch.zeros(96, 64).bfloat16())  # replaced
    fused.pack(lin, 2048)
    lin.float()  # cast after packing: the copy is bf16, the weight fp32
    assert fused.packed_weight(lin) is lin.weight


@needs_bf16
def test_weights_made_in_inference_mode_are_packed_and_prepared():
    """A model loaded inside ``torch.inference_mode`` (bench/towers.py's main is) has
    weights without a version counter: packing them raised "Inference tensors do not
    track version counter". They pack, and fp32 weights get their bf16 copy, as others."""
    from torch import nn

    from core.model import fused

    torch.manual_seed(0)
    with torch.inference_mode():
        lin = nn.Linear(64, 96).to(torch.bfloat16)
        fused.pack(lin, 256)
        x = torch.randn(7, 64).bfloat16()
        assert torch.equal(fused.plain_linear(x, lin), F.linear(x, lin.weight, lin.bias))
        lin32 = nn.Linear(64, 96)
        y = fused.linear(x.float(), lin32, torch.bfloat16)
        assert torch.equal(y, F.linear(x, lin32.weight.bfloat16(), lin32.bias.bfloat16()))


@needs_bf16
def test_prepared_bf16_copies_of_fp32_weights_fold_the_query_scale_and_follow_changes():
    """``fused.linear`` with a bf16 matmul over an fp32 layer (the speech encoder's
    windows) keeps one prepared bf16 copy (scaled query rows folded in, oneDNN's
    layout): the outputs of casting every call, bit for bit; a new copy when the
    weight is written or the scale changes."""
    from torch import nn

    from core.model import fused

    torch.manual_seed(0)
    lin = nn.Linear(32, 96)  # a fused q, k, v projection of width 32
    x = torch.randn(50, 32)

    def want(scale):
        w, b = lin.weight.detach().clone(), lin.bias.detach().clone()
        if scale is not None:
            w[:32] *= scale
            b[:32] *= scale
        return F.linear(x.bfloat16(), w.bfloat16(), b.bfloat16())

    with torch.inference_mode():
        for scale in (None, 0.125, None, 0.5):
            assert torch.equal(fused.linear(x, lin, torch.bfloat16, q_scale=scale), want(scale))
        with torch.no_grad():
            lin.weight.mul_(3)  # written in place
        assert torch.equal(fused.linear(x, lin, torch.bfloat16, q_scale=0.5), want(0.5))


@needs_bf16
def test_a_prepared_copy_keeps_the_storage_its_identity_names():
    """``lin.weight.data = new`` frees the old storage while the Parameter lives on. Held
    by the Parameter only, that address was free for the next weight of the same size,
    which then looked like the prepared one (same pointer, same version) and got stale
    outputs: seen in a process whose allocator reuses freed blocks at once (the model
    process's, ``keep_freed_memory``). The prepared copy holds the old storage itself."""
    from torch import nn

    from core.model import fused

    lin, x = nn.Linear(64, 96), torch.randn(5, 64)
    with torch.no_grad():
        fused.linear(x, lin, torch.bfloat16)
        old = lin.weight.data_ptr()
        lin.weight.data = torch.randn(96, 64)  # swapped: the Parameter stays
        held = lin.onednn_prepared[3][0]
        assert held.data_ptr() == old  # still allocated: no other weight can take it
        y = fused.linear(x, lin, torch.bfloat16)
    assert torch.equal(y, F.linear(x.bfloat16(), lin.weight.bfloat16(), lin.bias.bfloat16()))


def test_whisper_logits_run_on_a_packed_copy_of_the_tied_embedding():
    """The decoder's output projection (the tied (V, C) embedding, fp32) is kept in
    oneDNN's layout (``fused.PackedWeight``): the same logits as the plain matmul, with
    and without the suppression bias, at a beam step's rows; repacked, not served
    stale, after the embedding changes."""
    from core.model import fused
    from core.model.whisper.model import TextDecoder, WhisperConfig

    torch.manual_seed(0)
    dec = TextDecoder(WhisperConfig(n_vocab=500, dim=64, n_heads=2, n_text_layers=1))
    w = dec.tok.weight
    bias = torch.zeros(500).index_fill_(0, torch.tensor([3, 7]), float("-inf"))
    with torch.inference_mode():
        for n in (5, 80):
            x = torch.randn(n, 64)  # (n, C) final states
            assert torch.allclose(dec.logits(x), x @ w.T, atol=1e-5)
            assert torch.equal(dec.logits(x, bias).isinf(), (x @ w.T + bias).isinf())
            assert torch.allclose(dec.logits(x, bias)[:, 8:], (x @ w.T)[:, 8:], atol=1e-5)
        if fused.LINEAR_POINTWISE is not None:
            assert dec._head.get(w) is not w  # the packed copy
    with torch.no_grad():
        w.mul_(2)  # written in place
    with torch.inference_mode():
        x = torch.randn(5, 64)
        assert torch.allclose(dec.logits(x), x @ w.T, atol=1e-5)


@needs_bf16
def test_a_bf16_text_tower_runs_on_packed_weights(bf16_model):
    from core.model import fused

    lins = [m for m in bf16_model.text.modules() if getattr(m, "onednn_packed", None)]
    assert len(lins) == 4 * len(bf16_model.text.encoder.layers)
    assert all(fused.packed_weight(m) is not m.weight for m in lins)
