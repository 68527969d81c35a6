"""The ``mmq`` command line.

    mmq embed --modality text "a sentence" ...
    mmq classify --modality text --labels a,b,c "a sentence" ...
    mmq demo

``embed`` and ``classify`` run the model in this process (no queue) and print
JSON; with no inputs on the command line they read one input per stdin line.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from core.errors import InvalidInput

DEMO_TEXTS = [
    "The striker scored twice in the second half and the home side won the cup.",
    "Shares slid after the bank warned that profits would fall this quarter.",
    "Heavy rain and strong winds are expected along the coast tomorrow morning.",
    "Our new phone app lets you reset your password from the login page.",
    "The puppy chased the cat up a tree and barked until sunset.",
    "Simmer the tomatoes with garlic and basil, then stir in the pasta.",
]
DEMO_LABELS = ["sport", "finance", "weather", "technology", "animals", "cooking"]


def _inputs(args: argparse.Namespace) -> list[str]:
    if args.inputs:
        return args.inputs
    return [line.rstrip("\n") for line in sys.stdin if line.strip()]


def _load(args: argparse.Namespace):
    from core.model import MultimodalModel

    return MultimodalModel.load(path=args.model, device=args.device)


def cmd_embed(args: argparse.Namespace) -> int:
    model = _load(args)
    inputs = _inputs(args)
    results = model.embed_items(args.modality, inputs)
    out = [{"input": x, "tokens": r.tokens, "truncated": r.truncated,
            "embedding": [round(v, 7) for v in r.embedding.tolist()]}
           for x, r in zip(inputs, results, strict=True)]
    print(json.dumps({"model": model.version, "dim": model.dim, "results": out}))
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    model = _load(args)
    inputs = _inputs(args)
    labels = [lb.strip() for lb in args.labels.split(",")]
    items = model.embed_items(args.modality, inputs)
    import torch

    scores = model.scores(torch.stack([r.embedding for r in items]), labels, args.top_k)
    out = [{"input": x, "truncated": r.truncated, "labels": [[lb, p] for lb, p in s]}
           for x, r, s in zip(inputs, items, scores, strict=True)]
    print(json.dumps({"model": model.version, "results": out}))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Classify the bundled example texts with the default model, in this process."""
    model = _load(args)
    scores = model.classify("text", DEMO_TEXTS, DEMO_LABELS, top_k=1)
    print(f"model {model.version} on {model.device}; labels: {', '.join(DEMO_LABELS)}\n")
    print(f"{'label':<11} {'score':>6}  text")
    for text, top in zip(DEMO_TEXTS, scores, strict=True):
        label, p = top[0]
        print(f"{label:<11} {p:>6.3f}  {text}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mmq", description="Multimodal inference queue.")
    ap.add_argument("-v", "--verbose", action="store_true", help="log at INFO")
    sub = ap.add_subparsers(dest="command", required=True)

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--modality", default="text", choices=["text"])
        p.add_argument("--model", default=None, help="checkpoint directory (default: bundled)")
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: auto)")
        p.add_argument("inputs", nargs="*", help="inputs; none = one per stdin line")

    p = sub.add_parser("embed", help="embed inputs locally and print JSON")
    model_args(p)
    p.set_defaults(func=cmd_embed)
    p = sub.add_parser("classify", help="zero-shot classify inputs locally and print JSON")
    model_args(p)
    p.add_argument("--labels", required=True, help="comma-separated label texts")
    p.add_argument("--top-k", type=int, default=5)
    p.set_defaults(func=cmd_classify)
    p = sub.add_parser("demo", help="classify the bundled examples and print a table")
    p.add_argument("--model", default=None)
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_demo)
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
