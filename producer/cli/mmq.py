"""The ``mmq`` command line.

    mmq embed --modality text "a sentence" ...
    mmq classify --modality text --labels a,b,c "a sentence" ...
    mmq classify --modality image --labels "a cat,a dog" photo.jpg
    mmq classify --modality audio --labels yes,no clip.wav
    mmq train image|text|audio --data DIR --name NAME [--seed N] [--promote]
    mmq models list | show NAME | promote NAME | rollback MODALITY | rm NAME
    mmq up [--demo] | mmq worker text|image|audio | mmq demo
    mmq flower | mmq top [--interval S] [--once]
    mmq submit ... | status | wait | results | cancel | requeue | db upgrade
    mmq dead list | show N | drop N|--all
    mmq search "a cat" --modality image [-k 10] [--label L] [--since 1h] [--json]

``embed`` and ``classify`` run the model in this process (no queue) and print
JSON. Text inputs are the arguments (or one per stdin line); image and audio
inputs are file paths.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from core.errors import InvalidInput
from core.jobs import MODALITIES
from producer.cli.dead import add_dead_commands
from producer.cli.jobs import add_job_commands
from producer.cli.models import add_model_commands
from producer.cli.search import add_search_command
from producer.ops.stack import add_stack_commands
from producer.ops.top import add_top_command


def _inputs(args: argparse.Namespace) -> list[str]:
    if args.inputs:
        return args.inputs
    return [line.rstrip("\n") for line in sys.stdin if line.strip()]


def _payloads(args: argparse.Namespace, inputs: list[str]) -> list[object]:
    """Text stays text; image and audio arguments are files, read as bytes."""
    if args.modality == "text":
        return list(inputs)
    out: list[object] = []
    for name in inputs:
        try:
            out.append(Path(name).read_bytes())
        except OSError as e:
            raise InvalidInput(f"cannot read {name}: {e.strerror}") from None
    return out


def _load(args: argparse.Namespace):
    from core.model.multimodal import MultimodalModel

    return MultimodalModel.load(path=args.model, device=args.device)


def cmd_embed(args: argparse.Namespace) -> int:
    model = _load(args)
    inputs = _inputs(args)
    results = model.embed_items(args.modality, _payloads(args, inputs))
    out = [{"input": x, "tokens": r.tokens, "truncated": r.truncated,
            "embedding": [round(v, 7) for v in r.embedding.tolist()]}
           for x, r in zip(inputs, results, strict=True)]
    print(json.dumps({"model": model.version, "dim": model.dim, "results": out}))
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    model = _load(args)
    inputs = _inputs(args)
    from core.params import check_labels

    labels = check_labels([lb.strip() for lb in args.labels.split(",")])
    # Each tower's own zero-shot scoring: image distributions, audio label likelihoods.
    scores = model.classify(args.modality, _payloads(args, inputs), labels, args.top_k)
    out = [{"input": x, "labels": [[lb, p] for lb, p in s]}
           for x, s in zip(inputs, scores, strict=True)]
    print(json.dumps({"model": model.version, "results": out}))
    return 0


def cmd_demo_local(args: argparse.Namespace) -> int:
    """Classify the bundled example texts with the default model, in this process."""
    from producer.ops.stack import DEMO_TEXTS, TEXT_LABELS

    model = _load(args)
    scores = model.classify("text", DEMO_TEXTS, TEXT_LABELS, top_k=1)
    print(f"model {model.version} on {model.device}; labels: {', '.join(TEXT_LABELS)}\n")
    print(f"{'label':<11} {'score':>6}  text")
    for text, top in zip(DEMO_TEXTS, scores, strict=True):
        label, p = top[0]
        print(f"{label:<11} {p:>6.3f}  {text}")
    return 0


# -- `mmq api` -----------------------------------------------------------------------------------

def cmd_api(args) -> int:
    import uvicorn

    from core.config import get_settings
    from producer.web.auth import keyring

    s = get_settings()
    try:
        keys = keyring(s)
    except ValueError as e:
        raise SystemExit(f"mmq api: {e}") from None
    if not keys:
        raise SystemExit("mmq api: no API keys; set MMQ_API_KEYS=name1:key1,name2:key2 (or "
                         "MMQ_PROFILE=local to accept the local development key)")
    if s.local and not (s.api_keys or s.admin_keys):
        print(f"mmq api: local profile, accepting the development key {s.api_key_list[0]!r}")
    uvicorn.run("producer.api:create_app", factory=True, host=args.host or s.api_host,
                port=args.port or s.api_port, workers=args.workers, log_level="info",
                proxy_headers=True)
    return 0


def add_api_command(sub) -> None:
    p = sub.add_parser("api", help="serve the HTTP API (uvicorn)")
    p.add_argument("--host", default=None, help="default: MMQ_API_HOST (127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="default: MMQ_API_PORT (8000)")
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    p.set_defaults(func=cmd_api)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mmq", description="Multimodal inference queue.")
    ap.add_argument("-v", "--verbose", action="store_true", help="log at INFO")
    sub = ap.add_subparsers(dest="command", required=True)

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--modality", default="text", choices=MODALITIES)
        p.add_argument("--model", default=None, help="checkpoint directory (default: bundled)")
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: auto)")
        p.add_argument("inputs", nargs="*",
                       help="texts, or image/audio file paths; none = one per stdin line")

    p = sub.add_parser("embed", help="embed inputs locally and print JSON")
    model_args(p)
    p.set_defaults(func=cmd_embed)
    p = sub.add_parser("classify", help="zero-shot classify inputs locally and print JSON")
    model_args(p)
    p.add_argument("--labels", required=True, help="comma-separated label texts")
    p.add_argument("--top-k", type=int, default=5)
    p.set_defaults(func=cmd_classify)
    p = sub.add_parser("demo-local", help="classify example texts in this process (no queue)")
    p.add_argument("--model", default=None)
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_demo_local)
    add_job_commands(sub)
    add_model_commands(sub)
    add_search_command(sub)
    add_dead_commands(sub)
    add_stack_commands(sub)
    add_api_command(sub)
    add_top_command(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except InvalidInput as e:
        print(json.dumps({"error": "invalid_input", "message": str(e)}), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
