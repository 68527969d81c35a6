"""``mmq train``: fit an adapter on a frozen tower, and record it as a model version.

The tower runs once over the data (features cached), so each epoch costs only the
adapter's small MLP; that is what makes the digits adapter train in well under the
two minutes the issue allows on 2 CPU cores. Training pulls each item's adapted
vector towards the text embedding of its label name by cross-entropy over the label
set at the model's logit scale (20), exactly the rule ``classify`` scores with, so
classify by those labels improves and the vectors stay in the shared text space.

Split: a stratified, seeded held-out set (reported, never trained on or used to
stop), and a stratified validation slice of the rest for early stopping (the best
epoch's weights are kept). Augmentation is Gaussian noise on the standardised
features: the tower is frozen and its features cached, so pixel or waveform
augmentation would cost a tower forward per epoch.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from core.model.adapters import Adapter, AdapterConfig, save_adapter
from core.training.datasets import split_indices
from core.training.labelled import LabelledSet, prepare_all, read_contents, read_labelled

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
    logit_scale: float = 20.0  # ModelConfig.logit_scale: train at the scale classify uses


@dataclass
class Fitted:
    adapter: Adapter
    metrics: dict


def extract(model, modality: str, prepared: list, batch: int,
            progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the frozen tower once over every item -> (base vectors (N, D) as
    ``forward(unit=False)``, adapter features (N, F))."""
    bases, feats = [], []
    with tqdm(total=len(prepared), unit="item", desc="features", disable=not progress) as bar:
        for i in range(0, len(prepared), batch):
            b, f = model.forward_features(modality, prepared[i:i + batch])  # (b, D), (b, F)
            bases.append(b)
            feats.append(f)
            bar.update(len(prepared[i:i + batch]))
    return torch.cat(bases), torch.cat(feats)


def _split(labels: list[int], cfg: FinetuneConfig) -> tuple[list[int], list[int], list[int]]:
    y = torch.tensor(labels)
    rest, test = split_indices(y, cfg.held_out, cfg.seed, at_least_one=True)
    fit_local, val_local = split_indices(y[rest], cfg.val, cfg.seed + 1)
    fit = [rest[i] for i in fit_local]
    val = [rest[i] for i in val_local] or fit  # tiny sets: stop on the training loss
    return fit, val, test


def train_adapter(feats: torch.Tensor, base: torch.Tensor, labels: list[int],
                  label_emb: torch.Tensor, names: list[str], cfg: FinetuneConfig, *,
                  modality: str, feature: str, base_scores=None,
                  progress: bool = True) -> Fitted:
    """feats (N, F), base (N, D), labels (N,) indices into names, label_emb (L, D).
    ``base_scores(idx) -> (n, L)`` logits of the base tower, for the comparison."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    fit, val, test = _split(labels, cfg)
    y = torch.tensor(labels)
    acfg = AdapterConfig(modality=modality, feature=feature, in_dim=feats.shape[1],
                         dim=base.shape[1], hidden=cfg.hidden, logit_scale=cfg.logit_scale,
                         labels=tuple(names))
    adapter = Adapter(acfg)
    adapter.mean.copy_(feats[fit].mean(0))
    adapter.std.copy_(feats[fit].std(0).clamp_min(1e-4))
    opt = torch.optim.AdamW(adapter.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    targets = F.normalize(label_emb, dim=-1)  # (L, D)

    def loss_of(idx: list[int], noise: float = 0.0) -> torch.Tensor:
        x = feats[idx]  # (b, F)
        if noise:
            x = x + noise * adapter.std * torch.randn(x.shape, generator=gen)
        z = adapter(x, base[idx])  # (b, D)
        return F.cross_entropy(cfg.logit_scale * z @ targets.T, y[idx])

    t0 = time.perf_counter()
    # One thread: the MLP's matrices are small, and torch's OpenMP threads spinning
    # against other busy processes made an epoch 7x slower on the 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        epoch, best_epoch = _epochs(adapter, opt, fit, val, loss_of, cfg, gen, progress)
    finally:
        torch.set_num_threads(threads)
    adapter.eval()
    with torch.no_grad():
        pred = (adapter(feats[test], base[test]) @ targets.T).argmax(-1)  # (n_test,)
        base_pred = base_scores(test).argmax(-1) if base_scores is not None else None
    metrics = evaluate(pred, y[test], names)
    metrics |= {"base_accuracy": None if base_pred is None else
                round(float((base_pred == y[test]).float().mean()), 4),
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
    """The table ``mmq train`` prints at the end."""
    lines = [f"version {name}: held-out accuracy {m['accuracy']:.4f} "
             f"(pretrained tower zero-shot: {m['base_accuracy']}) on {m['n_held_out']} items; "
             f"{m['n_train']} trained, {m['n_val']} for early stopping; best epoch "
             f"{m['best_epoch']} of {m['epochs']}; {m['feature']} features ({m['feature_dim']}-d)",
             f"{'class':<24} accuracy"]
    lines += [f"{c:<24} {'-' if a is None else f'{a:.3f}'}" for c, a in m["per_class"].items()]
    if m["confusions"]:
        lines.append("most confused (true -> predicted: count): " + ", ".join(
            f"{t} -> {p}: {n}" for t, p, n in m["confusions"]))
    else:
        lines.append("no confusions on the held-out set")
    return "\n".join(lines)


def fit_dir(model, modality: str, data_dir: str | Path, cfg: FinetuneConfig,
            progress: bool = True) -> tuple[LabelledSet, str, Fitted]:
    """Read and check the data (``DataError`` before any training), cache the tower's
    features, train -> (data, data digest, fitted adapter)."""
    data = read_labelled(data_dir)
    contents = read_contents(data, modality)
    prepared = prepare_all(model, modality, data, contents)
    digest = data.digest([c.encode() if isinstance(c, str) else c for c in contents])
    feature, _ = model.feature_kind(modality)
    base, feats = extract(model, modality, prepared, cfg.extract_batch, progress)
    label_emb = model.embed("text", data.names)  # (L, D)
    scorer = lambda idx: _base_logits(model, modality, base[idx], data.names)  # noqa: E731
    fitted = train_adapter(feats, base, data.labels, label_emb, data.names, cfg,
                           modality=modality, feature=feature, base_scores=scorer,
                           progress=progress)
    return data, digest, fitted


def _base_logits(model, modality: str, vecs: torch.Tensor, names: list[str]) -> torch.Tensor:
    """(n, L) the pretrained tower's own classify scores (the image tower's rule too)."""
    lab = model.label_embeddings(names)
    if modality == "image":
        return model.photo.label_logits(vecs, lab)
    return vecs @ lab.T


def train_version(*, model, modality: str, data_dir: str | Path, name: str, sessions,
                  adapters_dir: str | Path, cfg: FinetuneConfig | None = None,
                  progress: bool = True, source: dict | None = None) -> dict:
    """Train and record version ``name`` (status ``candidate``) -> its row as a dict.
    ``source``: where the data came from, merged into the version's config instead of
    ``data_dir`` when that is only a temporary export (core/training/corrections.py).
    The weights go to a temp file renamed into place, then the row is written in one
    transaction; if anything fails (or is interrupted) after the file exists, the file
    is removed, so no half-written version is ever visible."""
    from core import store
    from core.store.versions import VersionError, check_version_name, create_version

    cfg = cfg or FinetuneConfig()
    check_version_name(name)
    with sessions() as s:
        if store.versions.get_version(session=s, name=name) is not None:
            raise VersionError(f"model version {name!r} exists already; pick a new name "
                               "(versions are immutable)")
    data, digest, fitted = fit_dir(model, modality, data_dir, cfg, progress)
    path, sha = save_adapter(fitted.adapter, Path(adapters_dir), name)
    try:
        with sessions.begin() as s:
            v = create_version(session=s, name=name, modality=modality,
                               base_model=model.version, data_digest=digest,
                               metrics=fitted.metrics | {"labels": data.names},
                               config={"finetune": asdict(cfg),
                                       "adapter": asdict(fitted.adapter.cfg)}
                               | (source or {"data_dir": str(Path(data_dir).resolve())}),
                               adapter_file=path.name, adapter_sha256=sha)
            return v.as_dict()
    except BaseException:
        path.unlink(missing_ok=True)
        raise
