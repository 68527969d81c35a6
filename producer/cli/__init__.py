"""The ``mmq`` command line: mmq.py builds the parser and holds ``main``; one module
per command group (jobs, models, search, dead; ``mmq up``/``top``/``flower`` are in
producer/ops)."""

from producer.cli.mmq import main

__all__ = ["main"]
