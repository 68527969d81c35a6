"""The old towers as fine-tuned versions: build the two datasets, `mmq train` each, print
the table (held-out accuracy, the pretrained tower's zero-shot accuracy, time).

    .venv/bin/python bench/finetune.py                    # digits + keywords, SQLite in a temp dir
    .venv/bin/python bench/finetune.py --only digits --features   # + the image feature choices

- digits: scikit-learn's 1,797 handwritten digits written as PNG folders (one per
  digit name, 32x32 like the old tower's data), trained with `Client.train("image")`;
  held-out = the command's own stratified 20%.
- keywords: the twenty words (zero..nine, yes/no/up/down/left/right/on/off/stop/go)
  synthesised with espeak-ng; trained on the training voices, scored on whole voice
  variants it never heard (core/training/datasets.py HELD_OUT_VARIANTS).
- --features: the image adapter's input measured on the digits (global head features,
  the 384-d zero-shot vector, the last block's map on a 2x2 grid), same training.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from core.config import Settings  # noqa: E402
from core.model.adapters import load_adapter  # noqa: E402
from core.training import datasets as ds  # noqa: E402
from core.training.finetune import FinetuneConfig, format_report, train_adapter  # noqa: E402
from core.training.labelled import prepare_all, read_contents, read_labelled  # noqa: E402


def write_digits(root: Path, size: int = 32) -> Path:
    x, y = ds.digits(size)  # (N, 3, size, size) dark ink on white in [0, 1]
    for i, (img, label) in enumerate(zip(x, y.tolist(), strict=True)):
        d = root / ds.DIGIT_WORDS[label]
        d.mkdir(parents=True, exist_ok=True)
        arr = (img[0].numpy() * 255).round().astype(np.uint8)
        Image.fromarray(arr, mode="L").save(d / f"{i:04d}.png")
    return root


def write_keywords(root: Path, variants: list[str], seed: int, per_voice: int = 1) -> Path:
    for clip in ds.speech_clips(variants, per_voice, seed):
        d = root / ds.AUDIO_WORDS[clip.word]
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{clip.voice.replace('+', '_')}-{len(list(d.iterdir())):05d}.wav").write_bytes(
            clip.wav)
    return root


def score_dir(model, modality: str, version: dict, adapters_dir: str, data_dir: Path) -> dict:
    """A recorded version (and the pretrained tower) on a labelled folder it never saw."""
    adapter = load_adapter(Path(adapters_dir) / version["adapter_file"],
                           version["adapter_sha256"])
    data = read_labelled(data_dir)
    prepared = prepare_all(model, modality, data, read_contents(data, modality))
    names = list(adapter.cfg.labels)
    lab = model.label_embeddings(names)  # (L, D)
    truth = torch.tensor([names.index(data.names[y]) for y in data.labels])
    hits = base_hits = 0
    with torch.inference_mode():
        for i in range(0, len(prepared), 64):
            vecs, feats = model.forward_features(modality, prepared[i:i + 64])
            z = adapter(feats, vecs)  # (b, D)
            t = truth[i:i + 64]
            hits += int(((z @ lab.T).argmax(-1) == t).sum())
            base = model.scores(vecs, names, 1, modality)
            base_hits += sum(int(names.index(s[0][0]) == int(y)) for s, y in zip(base, t,
                                                                                   strict=True))
    return {"accuracy": hits / len(truth), "base_accuracy": base_hits / len(truth),
            "n": len(truth)}


def feature_choices(model, digits_dir: Path, seed: int) -> list[tuple[str, int, float]]:
    """Held-out digits accuracy for each candidate image adapter input."""
    data = read_labelled(digits_dir)
    prepared = prepare_all(model, "image", data, read_contents(data, "image"))
    net, photo = model.photo.net, model.photo
    maps, ms, heads = [], [], []
    with torch.no_grad():  # plain tensors: training the adapters below needs autograd
        for i in range(0, len(prepared), 32):
            x = torch.stack([p.pixels for p in prepared[i:i + 32]])
            h = net.trunk(x.contiguous(memory_format=torch.channels_last))  # (b, 320, 7, 7)
            maps.append(h)
            heads.append(net.head(h))  # (b, 1280)
            ms.append(photo.forward_features(x)[0])  # (b, D)
    h, m, head = torch.cat(maps), torch.cat(ms), torch.cat(heads)
    lab = model.embed("text", data.names)
    rows = []
    for name, feats in (("head, global mean", head), ("zero-shot vector", m),
                        ("last block, 2x2 grid", F.adaptive_avg_pool2d(h, 2).flatten(1)),
                        ("last block, 3x3 grid", F.adaptive_avg_pool2d(h, 3).flatten(1))):
        fit = train_adapter(feats, m, data.labels, lab, data.names, FinetuneConfig(seed=seed),
                            modality="image", feature=name, progress=False)
        rows.append((name, feats.shape[1], fit.metrics["accuracy"]))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["digits", "keywords"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--features", action="store_true", help="also measure image adapter inputs")
    ap.add_argument("--voices", type=int, default=12, help="training voice variants (of 36)")
    args = ap.parse_args()

    from core.model.multimodal import MultimodalModel
    from producer.sdk import Client

    tmp = Path(tempfile.mkdtemp(prefix="mmq-finetune-"))
    settings = Settings(database_url=f"sqlite:///{tmp / 'mmq.db'}",
                        adapters_dir=str(tmp / "adapters"), broker_url="redis://127.0.0.1:1/0")
    client = Client(settings=settings)
    model = MultimodalModel.load(device="cpu", settings=settings)
    table = []
    if args.only in (None, "digits"):
        d = write_digits(tmp / "digits")
        t0 = time.perf_counter()
        v = client.train("image", d, "digits", seed=args.seed)
        secs = time.perf_counter() - t0
        print(format_report("digits", v["metrics"]))
        table.append(("digits (held-out 20%)", v["metrics"]["accuracy"],
                      v["metrics"]["base_accuracy"], secs))
        if args.features:
            print(f"\n{'image adapter input':<24} {'dim':>5} {'held-out':>9}")
            for name, dim, acc in feature_choices(model, d, args.seed):
                print(f"{name:<24} {dim:>5} {acc:>9.4f}")
    if args.only in (None, "keywords"):
        if not ds.espeak_available():
            raise SystemExit("espeak-ng is not installed (Debian: apt-get install espeak-ng)")
        train_dir = write_keywords(tmp / "kw-train", ds.TRAIN_VARIANTS[:args.voices], args.seed)
        test_dir = write_keywords(tmp / "kw-unseen", ds.HELD_OUT_VARIANTS, args.seed + 1)
        t0 = time.perf_counter()
        v = client.train("audio", train_dir, "keywords", seed=args.seed)
        secs = time.perf_counter() - t0
        print(format_report("keywords", v["metrics"]))
        unseen = score_dir(model, "audio", v, settings.adapters_path, test_dir)
        table.append((f"keywords (unseen voices, n={unseen['n']})", unseen["accuracy"],
                      unseen["base_accuracy"], secs))
    print(f"\n{'version':<36} {'adapter':>8} {'base':>8} {'train s':>8}")
    for name, acc, base, secs in table:
        print(f"{name:<36} {acc:>8.4f} {base:>8.4f} {secs:>8.1f}")
    print(f"(data, database and adapters in {tmp})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
