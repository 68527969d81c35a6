"""``mmq train`` and ``mmq models``: fine-tune an adapter, and manage model versions.

    mmq train image --data DIR --name digits-v1 [--seed 0] [--group-by RE] [--promote]
    mmq train text --from-corrections --name support-v2 [--owner KEY_ID]
    mmq models list [--modality image] | show NAME | promote NAME | rollback MODALITY
    mmq models rm NAME [--force]

Training runs in this process (it loads the model); the versions live in SQL
(``MMQ_DATABASE_URL``), their weights under ``MMQ_ADAPTERS_DIR``.
"""

from __future__ import annotations

import argparse
import json
import sys

from core.jobs import MODALITIES


def _client():
    from producer.sdk import Client

    return Client()


def cmd_train(args: argparse.Namespace) -> int:
    from core.errors import InvalidInput
    from core.store.versions import VersionError
    from core.training.finetune import FinetuneConfig, format_report
    from core.training.labelled import DataError

    cfg = FinetuneConfig(seed=args.seed, held_out=args.held_out, max_epochs=args.max_epochs,
                         patience=args.patience)
    if (args.data is None) == (not args.from_corrections):
        print("mmq train: give either --data DIR or --from-corrections", file=sys.stderr)
        return 2
    if args.owner and not args.from_corrections:
        print("mmq train: --owner goes with --from-corrections", file=sys.stderr)
        return 2
    try:
        c = _client()
        if args.from_corrections:
            v = c.train_from_corrections(args.modality, args.name, owner=args.owner,
                                         promote=args.promote, config=cfg,
                                         progress=not args.quiet)
        else:
            v = c.train(args.modality, args.data, args.name, promote=args.promote,
                        config=cfg, progress=not args.quiet, group_by=args.group_by)
    except (DataError, VersionError, InvalidInput) as e:
        print(f"mmq train: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # nothing was recorded (see train_version)
        print("mmq train: interrupted; no version was recorded", file=sys.stderr)
        return 130
    print(format_report(v["name"], v["metrics"]))
    if v.get("corrections") is not None:
        print(f"trained from {v['corrections']} corrected job(s)")
    print(f"recorded {v['modality']} version {v['name']} ({v['status']}); adapter "
          f"{v['adapter_file']} sha256 {v['adapter_sha256'][:16]}...")
    if args.promote and v["status"] != "promoted":
        print(f"not promoted: {v['name']} does not beat its base on the held-out items "
              f"({v['metrics']['accuracy']:.4f} vs {v['metrics']['base_accuracy']:.4f}); kept "
              f"as a candidate (mmq models promote {v['name']} promotes it anyway)")
    elif v["status"] != "promoted":
        print(f"use it: mmq submit {v['modality']} --model-version {v['name']} ...  "
              f"or make it the default: mmq models promote {v['name']}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from core.store.versions import VersionError

    c = _client()
    try:
        if args.action == "list":
            rows = c.models(args.modality)
            if args.json:
                print(json.dumps(rows, indent=2))
                return 0
            print(f"{'name':<28} {'modality':<8} {'status':<9} {'accuracy':>8} {'base':>8}"
                  "  created")
            for r in rows:
                acc, base = ("-" if x is None else f"{x:.4f}"
                             for x in (r["accuracy"], r.get("base_accuracy")))
                print(f"{r['name']:<28} {r['modality']:<8} {r['status']:<9} {acc:>8} "
                      f"{base:>8}  {(r['created_at'] or '')[:19]}")
            if not rows:
                print("(no versions; every modality serves its pretrained tower, 'base')")
            return 0
        if args.action == "show":
            v = c.model(args.target)
            if v is None:
                print(f"mmq models: no version {args.target!r}", file=sys.stderr)
                return 3
            print(json.dumps(v, indent=2))
            return 0
        if args.action == "promote":
            v = c.promote(args.target)
            print(f"{v['modality']} jobs that name no version now run {v['name']}")
            return 0
        if args.action == "rollback":
            if args.target not in MODALITIES:
                print(f"mmq models rollback: give a modality ({', '.join(MODALITIES)})",
                      file=sys.stderr)
                return 2
            old, new = c.rollback(args.target)
            print(f"{args.target}: {old} retired; jobs that name no version now run {new}")
            return 0
        v = c.remove_model(args.target, force=args.force)
        print(f"removed {v['name']} and {v['adapter_file']}")
        return 0
    except VersionError as e:
        print(f"mmq models: {e}", file=sys.stderr)
        return 1


def add_model_commands(sub) -> None:
    p = sub.add_parser("train", help="fine-tune an adapter on labelled data and record it "
                       "as a model version")
    p.add_argument("modality", choices=MODALITIES)
    p.add_argument("--data", help="one sub-folder per label, or a "
                   "labels.csv / labels.jsonl of path,label")
    p.add_argument("--from-corrections", action="store_true", help="instead of --data: "
                   "the stored inputs of the finished classify jobs whose right label was "
                   "marked (results page, PUT /v1/jobs/{id}/correction)")
    p.add_argument("--owner", help="with --from-corrections: only this API key id's jobs "
                   "(default: every key's)")
    p.add_argument("--name", required=True, help="the new version's name (unique)")
    p.add_argument("--seed", type=int, default=0, help="split, initialisation and order")
    p.add_argument("--held-out", type=float, default=0.2, help="fraction of every class "
                   "held out and reported (default 0.2)")
    p.add_argument("--max-epochs", type=int, default=150)
    p.add_argument("--patience", type=int, default=15, help="early stopping: epochs "
                   "without a better validation loss")
    p.add_argument("--group-by", metavar="RE", help="a regular expression on each file's "
                   "path under --data naming its group (speaker, session, source; the first "
                   "capture group, or the whole match); held-out items are then whole "
                   "groups training never saw. Overrides a labels file's group column")
    p.add_argument("--promote", action="store_true", help="make it the default at once, if "
                   "it beats its base on the held-out items (else it stays a candidate)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("models", help="model versions: list, show, promote, rollback, rm")
    p.add_argument("action", choices=["list", "show", "promote", "rollback", "rm"])
    p.add_argument("target", nargs="?", help="a version name (rollback: a modality)")
    p.add_argument("--modality", choices=MODALITIES, help="list: only this modality")
    p.add_argument("--force", action="store_true", help="rm even if queued jobs name it")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)
