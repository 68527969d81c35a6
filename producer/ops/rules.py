"""The alert thresholds, read from the rule file Prometheus loads (one place).

``producer/ops/monitoring/alerts.yml`` keeps every threshold as a constant recording
rule (``mmq:threshold:NAME``, ``expr: vector(N)``, optional static labels). `mmq top`
reads the same numbers here to mark what the rules would alert on, so the terminal
and the pager never disagree about a limit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

MONITORING = Path(__file__).parent / "monitoring"
RULES = MONITORING / "alerts.yml"
_VECTOR = re.compile(r"^\s*vector\(\s*([0-9.eE+-]+)\s*\)\s*$")


@dataclass(frozen=True)
class Thresholds:
    oldest_queued_s: float
    failure_ratio: float
    failure_min_jobs: float
    webhook_backlog: float
    latency_p95_s: dict[str, float] = field(default_factory=dict)  # modality -> SLO


def threshold_rules(path: Path = RULES) -> dict[tuple[str, tuple], float]:
    """(name without the ``mmq:threshold:`` prefix, sorted static labels) -> value."""
    doc = yaml.safe_load(path.read_text())
    out = {}
    for group in doc["groups"]:
        for rule in group["rules"]:
            name = rule.get("record", "")
            if not name.startswith("mmq:threshold:"):
                continue
            m = _VECTOR.match(rule["expr"])
            if not m:
                raise ValueError(f"{path}: {name} must be a constant vector(N), "
                                 f"not {rule['expr']!r}")
            labels = tuple(sorted((rule.get("labels") or {}).items()))
            out[(name.removeprefix("mmq:threshold:"), labels)] = float(m.group(1))
    return out


def load_thresholds(path: Path = RULES) -> Thresholds:
    t = threshold_rules(path)
    return Thresholds(
        oldest_queued_s=t[("oldest_queued_seconds", ())],
        failure_ratio=t[("failure_ratio", ())],
        failure_min_jobs=t[("failure_min_jobs", ())],
        webhook_backlog=t[("webhook_backlog", ())],
        latency_p95_s={dict(labels)["modality"]: v for (name, labels), v in t.items()
                       if name == "latency_p95_seconds"},
    )
