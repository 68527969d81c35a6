"""Training data from corrections: the corrected classify jobs of one modality, written
out as a labelled folder that ``mmq train`` reads like any other.

The stored inputs are the data: a text job's text (in its row), an image or audio job's
bytes (in ``blobs``); the label is the job's correction. They are written to a fresh
folder (``labels.jsonl`` plus one file per job, named by job id) so that training from
corrections goes through exactly the path training from a folder does: the same checks
(two classes at least, enough items per class, every input through the model's own
input checks), the same split, bars, base comparison and report. The caller passes the
folder to ``train_version`` and records ``source`` (how many corrections, whose) with
the version.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from core.store import get_blob
from core.store.corrections import corrected_jobs
from core.training.labelled import DataError


@dataclass(frozen=True)
class CorrectionsExport:
    count: int  # corrected jobs written
    labels: dict[str, int]  # items per label

    def source(self, owner: str | None) -> dict:
        """What the version records about its data (merged into its ``config``)."""
        return {"corrections": {"count": self.count, "owner": owner, "labels": self.labels}}


def export_corrections(sessions, modality: str, dest: str | Path, *,
                       owner: str | None = None) -> CorrectionsExport:
    """Write every corrected ``modality`` classify job (with ``owner``: that key id's)
    into ``dest`` (an empty folder) as ``labels.jsonl`` and one file per job.
    ``DataError`` when there is none."""
    dest = Path(dest)
    rows: list[str] = []
    labels: dict[str, int] = {}
    with sessions() as s:
        for job in corrected_jobs(session=s, modality=modality, owner=owner):
            if job.text is not None:
                name, data = f"{job.job_id}.txt", job.text.encode("utf-8")
            elif job.payload_sha256 is not None:
                name, data = f"{job.job_id}.bin", get_blob(session=s, sha256=job.payload_sha256)
            else:  # a job always has one or the other; nothing to learn from otherwise
                continue
            (dest / name).write_bytes(data)
            rows.append(json.dumps({"path": name, "label": job.label}))
            labels[job.label] = labels.get(job.label, 0) + 1
    if not rows:
        whose = f" of key {owner!r}" if owner else ""
        raise DataError(f"no corrected {modality} classify jobs{whose} to train from: mark "
                        "the right label of finished jobs on the results page (/ui) or with "
                        "PUT /v1/jobs/{id}/correction first")
    (dest / "labels.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return CorrectionsExport(len(rows), dict(sorted(labels.items())))
