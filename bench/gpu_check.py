"""One self-contained check for a CUDA machine (an H200, say); about 2-5 minutes.

1. The attention core's CUDA paths against the fp32 reference on ragged batches
   (varlen flash attention in fp16/bf16; grouped SDPA in fp32 and bf16).
2. The text tower's tokens/s at several batch sizes in fp32 and bf16, with the
   packed core, against a plain matmul measured in the same run.
3. The image tower on CUDA (channels_last, bf16 autocast): the held-out photographs'
   top-1 labels agree with the CPU's, and images/s at several batch sizes.
4. The speech tower on CUDA in fp16 (the encoder on the packed core, the decoder's KV
   cache and the beam search on the device): the bundled spoken examples' transcripts
   agree with the CPU fp32 ones, and audio-seconds/s at beam 5 over many windows.

    python bench/gpu_check.py            # exits 1 if any check fails
"""

from __future__ import annotations

import random
import sys
import time

import torch

from core.model.attention import AttentionPlan, packed_attention
from core.model.multimodal import MultimodalModel
from core.training.samples import sentences


def check_attention(dev: torch.device) -> bool:
    rng = random.Random(0)
    cases = {"one": [rng.randint(1, 64)], "singles": [1] * 7,
             "long among short": [rng.randint(1, 8) for _ in range(30)] + [2000],
             "mixed": [rng.randint(1, 512) for _ in range(64)]}
    ok = True
    print("attention vs fp32 reference (max abs error)")
    for name, lengths in cases.items():
        plan = AttentionPlan.from_lengths(lengths, device=dev)
        q, k, v = (torch.randn(sum(lengths), 12, 64, device=dev) for _ in range(3))
        ref = packed_attention(q, k, v, plan, "reference")
        for impl, dtype, tol in (("varlen", torch.float16, 2e-2), ("varlen", torch.bfloat16, 5e-2),
                                 ("grouped", torch.float32, 1e-4),
                                 ("grouped", torch.bfloat16, 5e-2)):
            try:
                out = packed_attention(q.to(dtype), k.to(dtype), v.to(dtype), plan, impl)
                err = (out.float() - ref).abs().max().item()
                good = err <= tol
            except Exception as e:  # noqa: BLE001  (report and go on)
                err, good = float("nan"), False
                print(f"  {name:<17} {impl:<8} {str(dtype):<15} ERROR {type(e).__name__}: {e}")
            ok &= good
            print(f"  {name:<17} {impl:<8} {str(dtype):<15} {err:.2e} {'ok' if good else 'FAIL'}")
    return ok


@torch.inference_mode()
def throughput(dev: torch.device) -> None:
    model = MultimodalModel.load(device=str(dev))
    texts = sentences(8192, seed=3)
    prepared = model.prepare_many("text", texts)
    a = torch.randn(8192, 4096, device=dev)
    for dtype in (torch.float32, torch.bfloat16):
        x = a.to(dtype)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(20):
            x @ x.T
        torch.cuda.synchronize()
        tflops = 20 * 2 * 8192 * 8192 * 4096 / (time.perf_counter() - t) / 1e12
        model.text.to(dtype)
        print(f"\ntext tower {str(dtype)} (matmul {tflops:.0f} TFLOP/s)")
        print(f"{'batch':>6} {'tokens/s':>12} {'sentences/s':>12}")
        for bs in (32, 128, 512, 2048):
            model.forward("text", prepared[:bs])  # warm-up, kernels chosen
            torch.cuda.synchronize()
            t = time.perf_counter()
            n_tok = 0
            for i in range(0, len(prepared), bs):
                chunk = prepared[i:i + bs]
                model.forward("text", chunk)
                n_tok += sum(p.tokens for p in chunk)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t
            print(f"{bs:>6} {n_tok / dt:>12.0f} {len(prepared) / dt:>12.0f}")
    model.text.float()


@torch.inference_mode()
def check_image(dev: torch.device) -> bool:
    from core.training import photo_eval as pe

    photos = [pe.photo_bytes(p, "JPEG") for p in pe.HELD_OUT]
    labels = pe.labels_of(pe.HELD_OUT)
    cpu, gpu = MultimodalModel.load(device="cpu"), MultimodalModel.load(device=str(dev))
    want = [r[0][0] for r in cpu.classify("image", photos, labels, top_k=1)]
    got = [r[0][0] for r in gpu.classify("image", photos, labels, top_k=1)]
    agree = sum(a == b for a, b in zip(want, got, strict=True))
    ok = agree >= len(want) - 1  # bf16 may flip one near-tie
    print(f"\nimage tower: CUDA bf16 top-1 agrees with CPU fp32 on {agree}/{len(want)} "
          f"{'ok' if ok else 'FAIL'}")
    prepared = gpu.prepare_many("image", photos * 64)
    print(f"{'batch':>6} {'images/s':>10}")
    for bs in (32, 128, 512):
        gpu.forward("image", prepared[:bs])  # warm-up
        torch.cuda.synchronize()
        t = time.perf_counter()
        for i in range(0, len(prepared), bs):
            gpu.forward("image", prepared[i:i + bs])
        torch.cuda.synchronize()
        print(f"{bs:>6} {len(prepared) / (time.perf_counter() - t):>10.0f}")
    return ok


def check_speech(dev: torch.device) -> bool:
    from core.model.whisper.tower import SpeechTower
    from producer.ops.stack import EXAMPLES

    clips = [p.read_bytes() for p in sorted(EXAMPLES.glob("spoken-*.wav"))]
    cpu = SpeechTower.from_bundled("cpu")
    want = cpu.transcribe([cpu.prepare(c) for c in clips])
    ok = True
    for dtype in (torch.float16, torch.bfloat16):
        gpu = SpeechTower.from_bundled(dev, dtype)
        items = [gpu.prepare(c) for c in clips]
        got = gpu.transcribe(items)
        agree = sum(a == b for a, b in zip(want, got, strict=True))
        good = agree >= len(want) - 1  # half precision may flip one near-tie
        ok &= good
        print(f"\nspeech tower: CUDA {str(dtype)[6:]} transcripts equal CPU fp32 on "
              f"{agree}/{len(want)} {'ok' if good else 'FAIL'}  {got}")
        seconds = sum(it.seconds for it in items)
        print(f"{'windows':>8} {'audio s/s':>10}  (beam 5)")
        for n in (32, 128):
            batch = items * (n // len(items))
            gpu.transcribe(batch[:8])  # warm-up
            torch.cuda.synchronize()
            t = time.perf_counter()
            gpu.transcribe(batch)
            torch.cuda.synchronize()
            rate = seconds * len(batch) / len(items) / (time.perf_counter() - t)
            print(f"{len(batch):>8} {rate:>10.0f}")
    return ok


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check here")
        return 2
    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}")
    t0 = time.perf_counter()
    ok = check_attention(dev)
    throughput(dev)
    ok &= check_image(dev)
    ok &= check_speech(dev)
    print(f"\n{'all checks passed' if ok else 'SOME CHECKS FAILED'} in "
          f"{time.perf_counter() - t0:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
