"""``mmq train``: fit a version on a frozen tower, compare it with its base, record it.

The tower runs once over the data (features, vectors and the base's own label scores
cached), so training costs only small fits on those tensors. A version has two parts
(core/model/adapters.py):

- the label head (core/training/head.py): a correction added to the base's own label
  scores (the decoder's for audio, the zero-shot comparison for images, cosine for
  text), chosen by cross-validation on the training data among "the base unchanged",
  "recalibrated" and "corrected by the features" at several strengths, so with little
  data a version starts from, and stays near, its base;
- the embedding adapter, an MLP pulling each item's vector towards the text embedding
  of its label (what the version's jobs store and search by).

Split: a seeded held-out set (reported, never trained on or used to choose): whole
groups (speakers, sessions, sources: ``LabelledSet.groups``) when the data has them,
so the figure is for groups training never saw; else a stratified fraction of every
class. A validation slice of the rest (groups again where given) stops the MLP early.
The base is scored on the same held-out items, class by class, beside the version;
``beats_base`` says whether the version did better, and ``--promote`` needs it to.

Augmentation of the MLP is Gaussian noise on the standardised features: the tower is
frozen and its features cached, so pixel or waveform augmentation would cost a tower
forward per epoch.
"""

from __future__ import annotations

import copy
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from core.model.adapters import Adapter, AdapterConfig, save_adapter
from core.training.datasets import split_indices
from core.training.head import HeadConfig, select_head
from core.training.labelled import (
    DataError,
    LabelledSet,
    prepare_all,
    read_contents,
    read_labelled,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneConfig:
    seed: int = 0
    held_out: float = 0.2  # stratified fraction of every class, reported at the end
    val: float = 0.1  # of the rest, for early stopping
    hidden: int = 256  # adapter MLP width
    lr: float = 3e-3
    weight_decay: float = 1e-2
    batch_size: int = 128
    max_epochs: int = 150
    patience: int = 15  # epochs without a better validation loss before stopping
    feature_noise: float = 0.2  # std of the noise on standardised features (augmentation)
    extract_batch: int = 32  # items per tower forward while caching features
    logit_scale: float = 20.0  # ModelConfig.logit_scale: the embedding MLP's training scale
    head: HeadConfig = field(default_factory=HeadConfig)


@dataclass
class Fitted:
    adapter: Adapter
    metrics: dict


@dataclass
class Cached:
    """What the frozen tower gives for every item, computed once."""

    base: torch.Tensor  # (N, D) vectors as ``forward(unit=False)``
    feats: torch.Tensor  # (N, F) adapter features
    logits: torch.Tensor  # (N, L) the base's own label scores over ``names``


def extract(model, modality: str, prepared: list, names: list[str], batch: int,
            progress: bool = True) -> Cached:
    """Run the frozen tower once over every item, scoring ``names`` as ``predict`` does."""
    bases, feats, logits = [], [], []
    with tqdm(total=len(prepared), unit="item", desc="features", disable=not progress) as bar:
        for i in range(0, len(prepared), batch):
            b, f, lg = model.scored_features(modality, prepared[i:i + batch], names)
            bases.append(b)  # (b, D)
            feats.append(f)  # (b, F)
            logits.append(lg)  # (b, L)
            bar.update(len(prepared[i:i + batch]))
    return Cached(torch.cat(bases), torch.cat(feats), torch.cat(logits))


def _group_split(labels: list[int], groups: list[str], frac: float, seed: int,
                 what: str) -> tuple[list[int], list[int]]:
    """Whole groups out: about ``frac`` of them (at least one, never all), drawn so that
    every class keeps items on the training side -> (rest, out) item indices."""
    names = sorted(set(groups))
    k = min(len(names) - 1, max(1, round(len(names) * frac)))
    classes = set(labels)
    for attempt in range(50):
        rng = random.Random(seed * 1000 + attempt)
        out_groups = set(rng.sample(names, k))
        rest = [i for i, g in enumerate(groups) if g not in out_groups]
        if {labels[i] for i in rest} == classes:
            return rest, [i for i, g in enumerate(groups) if g in out_groups]
    raise DataError(f"no {what} split of the {len(names)} groups leaves every class on the "
                    "training side; give more groups, or fewer classes per group")


def split(labels: list[int], groups: list[str] | None, cfg: FinetuneConfig,
          ) -> tuple[list[int], list[int], list[int]]:
    """-> (fit, val, test) item indices: by whole groups where given, else stratified.
    ``val`` may be ``fit`` itself (too few items or groups: stop on the training loss)."""
    y = torch.tensor(labels)
    if groups is None:
        rest, test = split_indices(y, cfg.held_out, cfg.seed, at_least_one=True)
        fit_local, val_local = split_indices(y[rest], cfg.val, cfg.seed + 1)
    else:
        rest, test = _group_split(labels, groups, cfg.held_out, cfg.seed, "held-out")
        rest_groups = [groups[i] for i in rest]
        if len(set(rest_groups)) >= 3 and round(len(set(rest_groups)) * cfg.val) >= 1:
            fit_local, val_local = _group_split([labels[i] for i in rest], rest_groups,
                                                cfg.val, cfg.seed + 1, "validation")
        else:
            fit_local, val_local = list(range(len(rest))), []
    fit = sorted(rest[i] for i in fit_local)
    val = sorted(rest[i] for i in val_local) or fit
    return fit, val, sorted(test)


def train_adapter(cached: Cached, labels: list[int], label_emb: torch.Tensor,
                  names: list[str], cfg: FinetuneConfig, *, modality: str, feature: str,
                  groups: list[str] | None = None, progress: bool = True) -> Fitted:
    """Fit a version on cached tower outputs: ``labels`` (N,) index ``names``, label_emb
    (L, D) their text embeddings, ``groups`` (N,) or None. Scores it and the base on
    the same held-out items."""
    feats, base = cached.feats, cached.base
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    fit, val, test = split(labels, groups, cfg)
    y = torch.tensor(labels)
    acfg = AdapterConfig(modality=modality, feature=feature, in_dim=feats.shape[1],
                         dim=base.shape[1], hidden=cfg.hidden, logit_scale=cfg.logit_scale,
                         labels=tuple(names))
    adapter = Adapter(acfg)
    adapter.mean.copy_(feats[fit].mean(0))
    adapter.std.copy_(feats[fit].std(0).nan_to_num(1.0).clamp_min(1e-4))
    opt = torch.optim.AdamW(adapter.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    targets = F.normalize(label_emb, dim=-1)  # (L, D)

    def loss_of(idx: list[int], noise: float = 0.0) -> torch.Tensor:
        x = feats[idx]  # (b, F)
        if noise:
            x = x + noise * adapter.std * torch.randn(x.shape, generator=gen)
        z = adapter(x, base[idx])  # (b, D)
        return F.cross_entropy(cfg.logit_scale * z @ targets.T, y[idx])

    t0 = time.perf_counter()
    # One thread: the matrices are small, and torch's OpenMP threads spinning against
    # other busy processes made an epoch 7x slower on the 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        epoch, best_epoch = _epochs(adapter, opt, fit, val, loss_of, cfg, gen, progress)
        # The label head learns from every training item (fit and validation alike):
        # its own cross-validation, by group where there are groups, does the choosing.
        train = sorted(set(fit) | set(val))
        head, choice = select_head(cached.logits[train], adapter.standardise(feats[train]),
                                   y[train], None if groups is None else
                                   [groups[i] for i in train], cfg.head, cfg.seed)
    finally:
        torch.set_num_threads(threads)
    adapter.set_head(head.scale, head.bias, head.weight)
    adapter.eval()
    with torch.no_grad():
        pred = adapter.label_logits(cached.logits[test], feats[test], names).argmax(-1)
        cos_pred = (adapter(feats[test], base[test]) @ targets.T).argmax(-1)  # (n_test,)
    base_m = evaluate(cached.logits[test].argmax(-1), y[test], names)
    metrics = evaluate(pred, y[test], names)
    metrics |= {"base_accuracy": base_m["accuracy"], "base_per_class": base_m["per_class"],
                "beats_base": metrics["accuracy"] > base_m["accuracy"],
                "embedding_accuracy": round(float((cos_pred == y[test]).float().mean()), 4),
                "head": choice, "split": "groups" if groups is not None else "stratified",
                "n_groups": None if groups is None else len(set(groups)),
                "held_out_groups": None if groups is None else
                sorted({groups[i] for i in test}),
                "n_train": len(fit), "n_val": len(val) if val is not fit else 0,
                "n_held_out": len(test), "epochs": epoch + 1, "best_epoch": best_epoch + 1,
                "train_s": round(time.perf_counter() - t0, 2), "feature": feature,
                "feature_dim": int(feats.shape[1])}
    return Fitted(adapter, metrics)


def _epochs(adapter: Adapter, opt, fit: list[int], val: list[int], loss_of,
            cfg: FinetuneConfig, gen: torch.Generator, progress: bool) -> tuple[int, int]:
    """Train until the validation loss stops improving for ``patience`` epochs; leave
    the best epoch's weights in ``adapter`` -> (last epoch run, best epoch), 0-based."""
    best, best_state, best_epoch, epoch = float("inf"), None, 0, 0
    bar = tqdm(range(cfg.max_epochs), unit="epoch", desc="train", disable=not progress)
    for epoch in bar:
        adapter.train()
        order = [fit[i] for i in torch.randperm(len(fit), generator=gen).tolist()]
        for i in range(0, len(order), cfg.batch_size):
            loss = loss_of(order[i:i + cfg.batch_size], cfg.feature_noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        adapter.eval()
        with torch.no_grad():
            v = float(loss_of(val))
        bar.set_postfix(train=f"{float(loss.detach()):.3f}", val=f"{v:.3f}")
        if v < best - 1e-4:
            best, best_state, best_epoch = v, copy.deepcopy(adapter.state_dict()), epoch
        elif epoch - best_epoch >= cfg.patience:
            break
    bar.close()
    adapter.load_state_dict(best_state)
    return epoch, best_epoch


def evaluate(pred: torch.Tensor, truth: torch.Tensor, names: list[str], top: int = 10) -> dict:
    """Accuracy, per-class accuracy and the most frequent confusions (true -> predicted)."""
    per_class = {}
    for c, name in enumerate(names):
        mask = truth == c
        per_class[name] = round(float((pred[mask] == c).float().mean()), 4) if mask.any() else None
    pairs: dict[tuple[int, int], int] = {}
    for t, p in zip(truth.tolist(), pred.tolist(), strict=True):
        if t != p:
            pairs[(t, p)] = pairs.get((t, p), 0) + 1
    worst = sorted(pairs.items(), key=lambda kv: -kv[1])[:top]
    return {"accuracy": round(float((pred == truth).float().mean()), 4) if len(truth) else None,
            "per_class": per_class,
            "confusions": [[names[t], names[p], n] for (t, p), n in worst]}


def format_report(name: str, m: dict) -> str:
    """The table ``mmq train`` prints at the end: the version beside its base, per class."""
    groups = m.get("held_out_groups")
    held = (f"{m['n_held_out']} items of {len(groups)} unseen group(s) ("
            f"{', '.join(groups[:6])}{', ...' if len(groups) > 6 else ''})"
            if groups else f"{m['n_held_out']} items (stratified)")
    head = m.get("head") or {}
    lines = [f"version {name} on {held}; {m['n_train']} trained, {m['n_val']} for early "
             f"stopping; {m['feature']} features ({m['feature_dim']}-d); label head: "
             f"{head.get('kind', '-')}" + (f" (l2 {head['l2']:g})" if head.get("kind") ==
                                            "features" else ""),
             f"{'class':<24} {'base':>6} {'version':>8}"]
    base_pc = m.get("base_per_class") or {}
    for c, a in m["per_class"].items():
        b = base_pc.get(c)
        lines.append(f"{c:<24} {'-' if b is None else f'{b:.3f}':>6} "
                     f"{'-' if a is None else f'{a:.3f}':>8}")
    base = m.get("base_accuracy")
    lines.append(f"{'all':<24} {'-' if base is None else f'{base:.3f}':>6} "
                 f"{m['accuracy']:>8.3f}")
    if base is not None:
        diff = m["accuracy"] - base
        lines.append(f"the version {'beats' if m.get('beats_base') else 'does NOT beat'} its "
                     f"base on the held-out items ({diff * 100:+.1f} points)")
    if m["confusions"]:
        lines.append("most confused (true -> predicted: count): " + ", ".join(
            f"{t} -> {p}: {n}" for t, p, n in m["confusions"]))
    else:
        lines.append("no confusions on the held-out set")
    return "\n".join(lines)


def fit_labelled(model, modality: str, data: LabelledSet, contents: list[object],
                 cfg: FinetuneConfig, progress: bool = True) -> tuple[str, Fitted]:
    """The training entry point for any labelled data (a folder, stored jobs and their
    corrections): ``contents`` are the items as the model takes them (text, or bytes),
    one per ``data.paths`` entry (names for messages). Checks every item through the
    model's front end (``DataError`` before any training), caches the tower's outputs,
    trains -> (data digest, fitted version)."""
    prepared = prepare_all(model, modality, data, contents)
    digest = data.digest([c.encode() if isinstance(c, str) else c for c in contents])
    feature, _ = model.feature_kind(modality)
    cached = extract(model, modality, prepared, data.names, cfg.extract_batch, progress)
    label_emb = model.embed("text", data.names)  # (L, D)
    fitted = train_adapter(cached, data.labels, label_emb, data.names, cfg,
                           modality=modality, feature=feature, groups=data.groups,
                           progress=progress)
    return digest, fitted


def fit_dir(model, modality: str, data_dir: str | Path, cfg: FinetuneConfig,
            progress: bool = True, group_by: str | None = None,
            ) -> tuple[LabelledSet, str, Fitted]:
    """``fit_labelled`` on a folder (``read_labelled``) -> (data, digest, fitted)."""
    data = read_labelled(data_dir, group_by=group_by)
    digest, fitted = fit_labelled(model, modality, data, read_contents(data, modality), cfg,
                                  progress)
    return data, digest, fitted


def train_labelled(*, model, modality: str, data: LabelledSet, contents: list[object],
                   name: str, sessions, adapters_dir: str | Path,
                   cfg: FinetuneConfig | None = None, progress: bool = True,
                   source: dict | None = None) -> dict:
    """Train and record version ``name`` (status ``candidate``) from labelled data ->
    its row as a dict. ``source`` goes into the version's config (where the data came
    from). The weights go to a temp file renamed into place, then the row is written in
    one transaction; if anything fails (or is interrupted) after the file exists, the
    file is removed, so no half-written version is ever visible."""
    from core import store
    from core.store.versions import VersionError, check_version_name, create_version

    cfg = cfg or FinetuneConfig()
    check_version_name(name)
    with sessions() as s:
        if store.versions.get_version(session=s, name=name) is not None:
            raise VersionError(f"model version {name!r} exists already; pick a new name "
                               "(versions are immutable)")
    digest, fitted = fit_labelled(model, modality, data, contents, cfg, progress)
    path, sha = save_adapter(fitted.adapter, Path(adapters_dir), name)
    try:
        with sessions.begin() as s:
            v = create_version(session=s, name=name, modality=modality,
                               base_model=model.version, data_digest=digest,
                               metrics=fitted.metrics | {"labels": data.names},
                               config={"finetune": asdict(cfg),
                                       "adapter": asdict(fitted.adapter.cfg)}
                               | (source or {}),
                               adapter_file=path.name, adapter_sha256=sha)
            return v.as_dict()
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def train_version(*, model, modality: str, data_dir: str | Path, name: str, sessions,
                  adapters_dir: str | Path, cfg: FinetuneConfig | None = None,
                  progress: bool = True, group_by: str | None = None,
                  source: dict | None = None) -> dict:
    """``train_labelled`` on a folder (``read_labelled``: checked before the model runs).
    ``source``: where the data came from, recorded instead of ``data_dir`` when that is
    only a temporary export (core/training/corrections.py)."""
    data = read_labelled(data_dir, group_by=group_by)
    return train_labelled(model=model, modality=modality, data=data,
                          contents=read_contents(data, modality), name=name,
                          sessions=sessions, adapters_dir=adapters_dir, cfg=cfg,
                          progress=progress,
                          source=source or {"data_dir": str(Path(data_dir).resolve()),
                                            "group_by": group_by})
