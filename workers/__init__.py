"""mmq workers: the Celery app, its one task, and worker start-up.

Start one with ``mmq worker text|image|audio`` (or ``python -m workers text``).
"""
