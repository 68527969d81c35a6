"""A user's labelled data for ``mmq train``: read, checked, and digested.

Two layouts: one sub-folder per label (``DIR/cat/*.jpg``, ``DIR/dog/*.jpg``), or a
``labels.csv`` (``path,label`` rows, a header optional) or ``labels.jsonl``
(``{"path": ..., "label": ...}`` per line) with paths relative to DIR. Everything
that can be wrong with the data is found here and by ``prepare_all``, before a
single training step: no class, one class, an empty class, a class too small to
hold one item out, a missing or unreadable file (named by path), and a path that
leads outside DIR (``../``, an absolute path, or a symlink): training reads only
what is inside the folder it was given.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from core.errors import InvalidInput
from core.params import label_text

INDEX_FILES = ("labels.csv", "labels.jsonl")


class DataError(ValueError):
    """The training data cannot be used; the message says which file or class and why."""


@dataclass
class LabelledSet:
    root: Path
    paths: list[Path]
    labels: list[int]  # index into names
    names: list[str]  # the label names, sorted: what the adapter learns to tell apart

    def digest(self, contents: list[bytes]) -> str:
        """sha256 over the (label, file sha256) pairs in order: the same data, the same
        digest, whatever the folder is called."""
        h = hashlib.sha256()
        for y, data in sorted((self.names[y], hashlib.sha256(b).hexdigest())
                              for y, b in zip(self.labels, contents, strict=True)):
            h.update(f"{y}\t{data}\n".encode())
        return h.hexdigest()


def _inside(root: Path, p: Path) -> None:
    """``DataError`` unless ``p``, every symlink followed, is inside ``root``: an index
    row like ``../../etc/passwd`` or ``/etc/hostname``, or a symlink in a class folder,
    must not make training read (and digest, and learn from) a file the user did not
    put in the folder."""
    real = p.resolve()
    if not real.is_relative_to(root.resolve()):
        raise DataError(f"{p}: outside the data folder {root} (it resolves to {real}); "
                        "only files inside it are read")


def _rows_from_index(root: Path) -> list[tuple[Path, str]] | None:
    csv_path, jsonl_path = root / "labels.csv", root / "labels.jsonl"
    rows: list[tuple[str, str]] = []
    if csv_path.exists():
        _inside(root, csv_path)
        with open(csv_path, newline="", encoding="utf-8") as f:
            for n, row in enumerate(csv.reader(f), 1):
                if not row or not "".join(row).strip():
                    continue
                if n == 1 and [c.strip().lower() for c in row] == ["path", "label"]:
                    continue
                if len(row) != 2:
                    raise DataError(f"{csv_path}:{n}: expected 'path,label', got {row!r}")
                rows.append((row[0].strip(), row[1].strip()))
    elif jsonl_path.exists():
        _inside(root, jsonl_path)
        for n, line in enumerate(jsonl_path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
                rows.append((str(doc["path"]).strip(), str(doc["label"]).strip()))
            except (ValueError, KeyError, TypeError):
                raise DataError(f"{jsonl_path}:{n}: expected {{\"path\": ..., \"label\": ...}}, "
                                f"got {line[:80]!r}") from None
    else:
        return None
    for p, label in rows:
        if not p or not label:
            raise DataError(f"{root}: a row with an empty path or label ({p!r}, {label!r})")
    return [(root / p, label_text(label)) for p, label in rows]


def _rows_from_folders(root: Path) -> list[tuple[Path, str]]:
    rows: list[tuple[Path, str]] = []
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    for d in classes:
        _inside(root, d)
        files = sorted(p for p in d.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise DataError(f"class {d.name!r} ({d}) has no files")
        rows += [(p, label_text(d.name)) for p in files]
    return rows


def read_labelled(root: str | Path, *, min_per_class: int = 2) -> LabelledSet:
    """The files and labels under ``root``; ``DataError`` if they cannot train a model."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    rows = _rows_from_index(root)
    if rows is None:
        rows = _rows_from_folders(root)
    for p, _ in rows:
        _inside(root, p)
    if not rows:
        raise DataError(f"{root}: no labelled files (expected one sub-folder per label, or "
                        f"{' or '.join(INDEX_FILES)})")
    names = sorted({label for _, label in rows})
    if len(names) < 2:
        raise DataError(f"{root}: only one class ({names[0]!r}); an adapter learns to tell "
                        "classes apart, give at least two")
    counts = {n: 0 for n in names}
    for _, label in rows:
        counts[label] += 1
    small = [n for n, c in counts.items() if c < min_per_class]
    if small:
        raise DataError(f"class {small[0]!r} has {counts[small[0]]} file(s); each class needs "
                        f"at least {min_per_class} (one or more to train on, one held out)")
    index = {n: i for i, n in enumerate(names)}
    return LabelledSet(root, [p for p, _ in rows], [index[lb] for _, lb in rows], names)


def read_contents(data: LabelledSet, modality: str) -> list[object]:
    """Each file's content as the model takes it (text for text, bytes otherwise)."""
    out: list[object] = []
    for p in data.paths:
        try:
            raw = p.read_bytes()
        except OSError as e:
            raise DataError(f"{p}: cannot read ({e.strerror or e})") from None
        if modality == "text":
            try:
                out.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise DataError(f"{p}: not UTF-8 text") from None
        else:
            out.append(raw)
    return out


def prepare_all(model, modality: str, data: LabelledSet, contents: list[object]) -> list:
    """Every item through the model's own input checks and front end -> prepared
    items; the first bad file is a ``DataError`` naming it."""
    prepared = model.prepare_many(modality, contents)
    for p, item in zip(data.paths, prepared, strict=True):
        if isinstance(item, InvalidInput):
            raise DataError(f"{p}: {item.reason}")
    return prepared
