"""mmq workers: the Celery app, routing and tasks (the job pipeline, issue [3/5]).

Nothing lives here yet; the model they will host is ``core.model.MultimodalModel``.
"""
