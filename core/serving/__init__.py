"""The serving runtime of a worker process, free of Celery: the model host (a job's
stages: start -> prepare -> forward -> record), the worker runtime (host + lease),
the model process and its dynamic batcher, the group-commit writer, batching
metrics and their Prometheus exporter.

workers/ is the Celery glue around it: the app, the task, signal handlers and the
entry point.
"""
