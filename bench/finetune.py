"""Fine-tuned versions against their base: `mmq train` on three data sets, each version
scored beside the pretrained tower ('base', zero-shot with the same labels) on data it
never saw, and the few-shot curve (accuracy against examples per class).

    .venv/bin/python bench/finetune.py                      # digits, keywords, topics + curves
    .venv/bin/python bench/finetune.py --only keywords --unseen-voices 16
    .venv/bin/python bench/finetune.py --only digits --features   # + the image feature choices

- digits: scikit-learn's 1,797 handwritten digits written as PNG folders (one per
  digit name, 32x32), trained with `Client.train("image")`; held-out = the command's own
  stratified 20%.
- keywords: the twenty words (zero..nine, yes/no/up/down/left/right/on/off/stop/go)
  synthesised with espeak-ng by 5 voices, one clip per word and voice (100 clips), trained
  with ``group_by`` the voice (so the command's held-out figure is for an unseen voice),
  then scored on voices training never heard (HELD_OUT_VARIANTS), through the same
  label scoring a worker runs.
- topics: a 4-topic text classifier (sport, finance, health, politics) from 20
  sentences per topic (core/training/samples.py), scored on 40 other sentences per topic.
- curve: for k in 1, 2, 5, 20 examples per class (k voices per word for keywords), the
  version's label head (core/training/head.py, chosen by its own cross-validation) and
  the base on the same unseen items, mean over seeds; from the tower outputs cached once.

Figures are accuracies on the stated items; the base column is the pretrained tower on
exactly those items, measured in the same run.
"""

from __future__ import annotations

import argparse
import random
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
from core.training.finetune import (  # noqa: E402
    Cached,
    FinetuneConfig,
    extract,
    format_report,
    train_adapter,
)
from core.training.head import HeadConfig, select_head  # noqa: E402
from core.training.labelled import prepare_all, read_contents, read_labelled  # noqa: E402
from core.training.samples import topic_sentences  # noqa: E402

KW_GROUP_BY = r"/(.+)-\d+\.wav$"  # keywords/<word>/<voice>-<n>.wav: the voice
SHOTS = (1, 2, 5, 20)


def write_digits(root: Path, size: int = 32) -> Path:
    x, y = ds.digits(size)  # (N, 3, size, size) dark ink on white in [0, 1]
    for i, (img, label) in enumerate(zip(x, y.tolist(), strict=True)):
        d = root / ds.DIGIT_WORDS[label]
        d.mkdir(parents=True, exist_ok=True)
        arr = (img[0].numpy() * 255).round().astype(np.uint8)
        Image.fromarray(arr, mode="L").save(d / f"{i:04d}.png")
    return root


def keyword_voices(n: int, held_out: bool) -> list[str]:
    """n accent+variant voices: training ones from TRAIN_VARIANTS, unseen ones from
    HELD_OUT_VARIANTS (two accents each), never the same variant on both sides."""
    if held_out:
        return [f"{ds.ACCENTS[(i * 3 + j) % 8]}+{v}"
                for i, v in enumerate(ds.HELD_OUT_VARIANTS) for j in range(2)][:n]
    return [f"{ds.ACCENTS[i % 8]}+{v}" for i, v in enumerate(ds.TRAIN_VARIANTS[:n])]


def write_keywords(root: Path, voices: list[str], seed: int) -> Path:
    """root/<word>/<voice>-<n>.wav: every word by every voice once (random speed, pitch)."""
    rng = random.Random(seed)
    for v in voices:
        for w in ds.AUDIO_WORDS:
            wav = ds.synthesise(w, v, rng.randint(110, 240), rng.randint(15, 85))
            d = root / w
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{v.replace('+', '_')}-{len(list(d.iterdir())):05d}.wav").write_bytes(wav)
    return root


def write_topics(root: Path, per_topic: int, seed: int) -> Path:
    for topic, texts in topic_sentences(per_topic, seed).items():
        (root / topic).mkdir(parents=True, exist_ok=True)
        for i, t in enumerate(texts):
            (root / topic / f"{i:03d}.txt").write_text(t)
    return root


def cache_dir(model, modality: str, data_dir: Path, names: list[str],
              group_by: str | None = None) -> tuple[Cached, list[int], list[str] | None]:
    """The tower's outputs for a labelled folder, scored over ``names`` (a version's label
    set, in its order) -> (cached, labels as indices into names, groups)."""
    data = read_labelled(data_dir, group_by=group_by)
    prepared = prepare_all(model, modality, data, read_contents(data, modality))
    cached = extract(model, modality, prepared, names, 32, progress=False)
    return cached, [names.index(data.names[y]) for y in data.labels], data.groups


def score_version(adapter, cached: Cached, labels: list[int], names: list[str],
                  ) -> tuple[float, float, dict, dict]:
    """A version (its adapter) and the base on cached items -> (version accuracy, base
    accuracy, per-class version, per-class base): the scoring ``predict`` runs."""
    y = torch.tensor(labels)
    with torch.no_grad():
        pred = adapter.label_logits(cached.logits, cached.feats, names).argmax(-1)
    base = cached.logits.argmax(-1)
    per = lambda p: {n: round(float((p[y == c] == c).float().mean()), 3)  # noqa: E731
                     for c, n in enumerate(names) if (y == c).any()}
    return (float((pred == y).float().mean()), float((base == y).float().mean()),
            per(pred), per(base))


def side_by_side(title: str, per_v: dict, per_b: dict, acc: float, base: float, n: int) -> None:
    print(f"\n{title} (n={n})\n{'class':<12} {'base':>6} {'version':>8}")
    for c in per_v:
        print(f"{c:<12} {per_b[c]:>6.3f} {per_v[c]:>8.3f}")
    print(f"{'all':<12} {base:>6.3f} {acc:>8.3f}   ({(acc - base) * 100:+.1f} points)")


def curve(train: Cached, y_train: list[int], groups: list[str] | None, test: Cached,
          y_test: list[int], shots: tuple[int, ...], seeds: int) -> list[tuple[int, float, float]]:
    """For k examples per class (k groups per class when ``groups``: whole voices), fit
    the label head on k-shot draws of ``train`` and score it and the base on ``test`` ->
    [(k, version accuracy, base accuracy)], means over ``seeds`` draws."""
    yt, ytest = torch.tensor(y_train), torch.tensor(y_test)
    base_acc = float((test.logits.argmax(-1) == ytest).float().mean())
    out = []
    for k in shots:
        accs = []
        for seed in range(seeds):
            rng = random.Random(seed)
            if groups is not None:
                names = sorted(set(groups))
                if k > len(names):
                    break
                keep = set(rng.sample(names, k))
                idx = [i for i, g in enumerate(groups) if g in keep]
            else:
                idx = []
                for c in sorted(set(y_train)):
                    members = [i for i, y in enumerate(y_train) if y == c]
                    if k > len(members):
                        break
                    idx += rng.sample(members, k)
            if not idx:
                break
            mean = train.feats[idx].mean(0)
            std = train.feats[idx].std(0).nan_to_num(1.0).clamp_min(1e-4)
            x = (train.feats[idx] - mean) / std
            g = None if groups is None else [groups[i] for i in idx]
            head, _ = select_head(train.logits[idx], x, yt[idx], g, HeadConfig(), seed)
            pred = head(test.logits, (test.feats - mean) / std).argmax(-1)
            accs.append(float((pred == ytest).float().mean()))
        if accs:
            out.append((k, sum(accs) / len(accs), base_acc))
    return out


def print_curve(name: str, rows: list[tuple[int, float, float]], n_test: int) -> None:
    print(f"\nfew-shot curve, {name} (n={n_test} unseen items)\n"
          f"{'per class':>9} {'base':>7} {'version':>8} {'gain':>7}")
    for k, acc, base in rows:
        print(f"{k:>9} {base:>7.3f} {acc:>8.3f} {(acc - base) * 100:>+6.1f}")


def feature_choices(model, digits_dir: Path, seed: int) -> list[tuple[str, int, float]]:
    """Held-out digits accuracy of the embedding MLP for each candidate image input."""
    data = read_labelled(digits_dir)
    prepared = prepare_all(model, "image", data, read_contents(data, "image"))
    tower, net = model.photo, model.photo.net
    maps, ms, heads = [], [], []
    with torch.no_grad():
        for i in range(0, len(prepared), 32):
            x = torch.stack([p.pixels for p in prepared[i:i + 32]])
            h = net.trunk(x.contiguous(memory_format=torch.channels_last))  # (b, 320, 7, 7)
            maps.append(h)
            heads.append(net.head(h))  # (b, 1280)
            ms.append(tower.forward_features(x)[0])  # (b, D)
    h, m, head = torch.cat(maps), torch.cat(ms), torch.cat(heads)
    lab = model.embed("text", data.names)
    logits = tower.label_logits(m, lab)  # (N, L)
    rows = []
    for name, feats in (("head, global mean", head), ("zero-shot vector", m),
                        ("last block, 2x2 grid", F.adaptive_avg_pool2d(h, 2).flatten(1)),
                        ("last block, 3x3 grid", F.adaptive_avg_pool2d(h, 3).flatten(1))):
        fit = train_adapter(Cached(m, feats, logits), data.labels, lab, data.names,
                            FinetuneConfig(seed=seed), modality="image", feature=name,
                            progress=False)
        rows.append((name, feats.shape[1], fit.metrics["embedding_accuracy"]))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["digits", "keywords", "topics"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--features", action="store_true", help="also measure image adapter inputs")
    ap.add_argument("--voices", type=int, default=5, help="training voices for keywords")
    ap.add_argument("--unseen-voices", type=int, default=4, help="unseen voices (of 16)")
    ap.add_argument("--curve-voices", type=int, default=0, help="training voices for the "
                    "keywords curve (20 for its 20-per-class point; 0: the --voices ones)")
    ap.add_argument("--seeds", type=int, default=3, help="draws per point of the curves")
    ap.add_argument("--no-curve", action="store_true")
    args = ap.parse_args()

    from core.model.multimodal import MultimodalModel
    from producer.sdk import Client

    tmp = Path(tempfile.mkdtemp(prefix="mmq-finetune-"))
    settings = Settings(database_url=f"sqlite:///{tmp / 'mmq.db'}",
                        adapters_dir=str(tmp / "adapters"), broker_url="redis://127.0.0.1:1/0")
    client = Client(settings=settings)
    model = MultimodalModel.load(device="cpu", settings=settings)
    table, curves = [], []

    def trained(modality: str, data_dir: Path, name: str, group_by: str | None = None):
        t0 = time.perf_counter()
        v = client.train(modality, data_dir, name, seed=args.seed, progress=False,
                         group_by=group_by)
        secs = time.perf_counter() - t0
        print(f"\n$ mmq train {modality} --data {data_dir} --name {name}"
              + (f" --group-by '{group_by}'" if group_by else "") + f"   ({secs:.0f} s)")
        print(format_report(name, v["metrics"]))
        adapter = load_adapter(Path(settings.adapters_path) / v["adapter_file"],
                               v["adapter_sha256"])
        return v, adapter, secs

    if args.only in (None, "digits"):
        d = write_digits(tmp / "digits")
        v, adapter, secs = trained("image", d, "digits")
        m = v["metrics"]
        table.append(("digits (held-out 20%)", m["n_held_out"], m["accuracy"],
                      m["base_accuracy"], secs))
        if not args.no_curve:
            names = v["metrics"]["labels"]
            cached, y, _ = cache_dir(model, "image", d, names)
            rng = random.Random(args.seed)
            order = list(range(len(y)))
            rng.shuffle(order)
            test = sorted(order[:540])  # the 540 held-out images
            train = sorted(order[540:])
            sub = lambda c, ix: Cached(c.base[ix], c.feats[ix], c.logits[ix])  # noqa: E731
            curves.append(("digits", curve(sub(cached, train), [y[i] for i in train], None,
                                           sub(cached, test), [y[i] for i in test], SHOTS,
                                           args.seeds), len(test)))
        if args.features:
            print(f"\n{'image adapter input':<24} {'dim':>5} {'held-out':>9}")
            for name, dim, acc in feature_choices(model, d, args.seed):
                print(f"{name:<24} {dim:>5} {acc:>9.4f}")
    if args.only in (None, "topics"):
        train_dir = write_topics(tmp / "topics-train", 20, args.seed)
        test_dir = write_topics(tmp / "topics-unseen", 40, args.seed + 1000)
        v, adapter, secs = trained("text", train_dir, "topics")
        names = v["metrics"]["labels"]
        test, y_test, _ = cache_dir(model, "text", test_dir, names)
        acc, base, per_v, per_b = score_version(adapter, test, y_test, names)
        side_by_side("topics: unseen sentences", per_v, per_b, acc, base, len(y_test))
        table.append(("topics (unseen sentences)", len(y_test), acc, base, secs))
        if not args.no_curve:
            curve_dir = write_topics(tmp / "topics-curve", 20, args.seed + 2000)
            train, y_train, _ = cache_dir(model, "text", curve_dir, names)
            curves.append(("topics", curve(train, y_train, None, test, y_test, SHOTS,
                                           args.seeds), len(y_test)))
    if args.only in (None, "keywords"):
        if not ds.espeak_available():
            raise SystemExit("espeak-ng is not installed (Debian: apt-get install espeak-ng)")
        voices = keyword_voices(args.voices, held_out=False)
        train_dir = write_keywords(tmp / "kw-train", voices, args.seed)
        test_dir = write_keywords(tmp / "kw-unseen", keyword_voices(args.unseen_voices, True),
                                  args.seed + 1)
        v, adapter, secs = trained("audio", train_dir, "keywords", group_by=KW_GROUP_BY)
        names = v["metrics"]["labels"]
        test, y_test, _ = cache_dir(model, "audio", test_dir, names)
        acc, base, per_v, per_b = score_version(adapter, test, y_test, names)
        side_by_side(f"keywords: {args.unseen_voices} unseen voices", per_v, per_b, acc, base,
                     len(y_test))
        table.append((f"keywords ({args.unseen_voices} unseen voices)", len(y_test), acc, base,
                      secs))
        if not args.no_curve:
            cdir = train_dir
            if args.curve_voices > args.voices:
                cdir = write_keywords(tmp / "kw-curve", keyword_voices(args.curve_voices, False),
                                      args.seed)
            train, y_train, groups = cache_dir(model, "audio", cdir, names, KW_GROUP_BY)
            curves.append(("keywords (k voices per word)", curve(
                train, y_train, groups, test, y_test, SHOTS, args.seeds), len(y_test)))
    for name, rows, n in curves:
        print_curve(name, rows, n)
    print(f"\n{'version':<34} {'n':>5} {'base':>7} {'version':>8} {'gain':>7} {'train s':>8}")
    for name, n, acc, base, secs in table:
        print(f"{name:<34} {n:>5} {base:>7.4f} {acc:>8.4f} {(acc - base) * 100:>+6.1f} "
              f"{secs:>8.1f}")
    print(f"(data, database and adapters in {tmp})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
