"""mmq core: settings, job vocabulary, the model and its batched attention core.

Nothing here imports Celery or the producers; both of those import this package.
"""
