"""A user's labelled data for ``mmq train``: read, checked, and digested.

Two layouts: one sub-folder per label (``DIR/cat/*.jpg``, ``DIR/dog/*.jpg``), or a
``labels.csv`` (``path,label`` rows, a header optional, or ``path,label,group``) or
``labels.jsonl`` (``{"path": ..., "label": ..., "group": ...}`` per line, ``group``
optional) with paths relative to DIR.

Groups (a speaker, a session, a source) keep related items together: the held-out
split is then made of whole groups training never saw (core/training/finetune.py), so
it measures what a user meets next, not the same speakers again. They come from the
index's ``group`` column, or from ``group_by``, a regular expression searched in each
file's path relative to DIR (its first capture group, or the whole match). Everything
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
import re
from dataclasses import dataclass
from pathlib import Path

from core.errors import InvalidInput
from core.params import label_text

INDEX_FILES = ("labels.csv", "labels.jsonl")
HEADER = ["path", "label", "group"]


class DataError(ValueError):
    """The training data cannot be used; the message says which file or class and why."""


@dataclass
class LabelledSet:
    root: Path
    paths: list[Path]
    labels: list[int]  # index into names
    names: list[str]  # the label names, sorted: what the adapter learns to tell apart
    # Per item its group (speaker, session, source), or None: no groups, the held-out
    # split is then stratified over items.
    groups: list[str] | None = None

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


def _rows_from_index(root: Path) -> list[tuple] | None:
    csv_path, jsonl_path = root / "labels.csv", root / "labels.jsonl"
    rows: list[tuple[str, ...]] = []
    if csv_path.exists():
        _inside(root, csv_path)
        with open(csv_path, newline="", encoding="utf-8") as f:
            for n, row in enumerate(csv.reader(f), 1):
                if not row or not "".join(row).strip():
                    continue
                if n == 1 and [c.strip().lower() for c in row] in (HEADER, HEADER[:2]):
                    continue
                if len(row) not in (2, 3):
                    raise DataError(f"{csv_path}:{n}: expected 'path,label' or "
                                    f"'path,label,group', got {row!r}")
                rows.append(tuple(c.strip() for c in row))
    elif jsonl_path.exists():
        _inside(root, jsonl_path)
        for n, line in enumerate(jsonl_path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
                row = (str(doc["path"]).strip(), str(doc["label"]).strip())
                if doc.get("group") is not None:
                    row += (str(doc["group"]).strip(),)
                rows.append(row)
            except (ValueError, KeyError, TypeError):
                raise DataError(f"{jsonl_path}:{n}: expected {{\"path\": ..., \"label\": ...}}, "
                                f"got {line[:80]!r}") from None
    else:
        return None
    grouped = [len(r) == 3 for r in rows]
    if any(grouped) and not all(grouped):
        missing = next(r for r in rows if len(r) == 2)
        raise DataError(f"{root}: some rows name a group and {missing[0]!r} does not; give "
                        "every row a group, or none")
    for row in rows:
        if not all(row):
            raise DataError(f"{root}: a row with an empty path, label or group ({row!r})")
    return [(root / r[0], label_text(r[1]), *r[2:]) for r in rows]


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


def _groups_by(root: Path, paths: list[Path], pattern: str) -> list[str]:
    """Each file's group: ``pattern`` searched in its path relative to ``root``."""
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise DataError(f"--group-by {pattern!r}: not a regular expression ({e})") from None
    out = []
    for p in paths:
        rel = p.relative_to(root).as_posix()
        m = rx.search(rel)
        if m is None:
            raise DataError(f"{p}: --group-by {pattern!r} does not match its path {rel!r}; "
                            "every file needs a group")
        out.append(m.group(1) if rx.groups else m.group(0))
    return out


def read_labelled(root: str | Path, *, min_per_class: int = 2,
                  group_by: str | None = None) -> LabelledSet:
    """The files and labels under ``root``; ``DataError`` if they cannot train a model.
    ``group_by``: a regular expression on each file's relative path naming its group
    (overrides an index's ``group`` column)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    rows = _rows_from_index(root)
    if rows is None:
        rows = _rows_from_folders(root)
    for p, *_ in rows:
        _inside(root, p)
    if not rows:
        raise DataError(f"{root}: no labelled files (expected one sub-folder per label, or "
                        f"{' or '.join(INDEX_FILES)})")
    names = sorted({r[1] for r in rows})
    if len(names) < 2:
        raise DataError(f"{root}: only one class ({names[0]!r}); an adapter learns to tell "
                        "classes apart, give at least two")
    counts = {n: 0 for n in names}
    for _, label, *_ in rows:
        counts[label] += 1
    small = [n for n, c in counts.items() if c < min_per_class]
    if small:
        raise DataError(f"class {small[0]!r} has {counts[small[0]]} file(s); each class needs "
                        f"at least {min_per_class} (one or more to train on, one held out)")
    index = {n: i for i, n in enumerate(names)}
    paths = [r[0] for r in rows]
    groups = (_groups_by(root, paths, group_by) if group_by
              else [r[2] for r in rows] if len(rows[0]) == 3 else None)
    if groups is not None and len(set(groups)) < 2:
        raise DataError(f"{root}: every file is in one group ({groups[0]!r}); the held-out "
                        "split needs at least two groups (one to train on, one unseen)")
    return LabelledSet(root, paths, [index[r[1]] for r in rows], names, groups)


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
