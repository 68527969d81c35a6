"""The broker contract, shared by producers and workers: how queues are declared,
how a job's message is sent, what lives under which Redis key, and the repairs
(the sweep, dead letters, admission) that keep the queues and the store agreeing.

- ``queues``: queue declarations for both sides, and the Redis key layout;
- ``sender``: the producer's Celery app, sending jobs, reading queue depths;
- ``admission``: the queue limit, checked and reserved in one Redis script;
- ``sweep``: re-sends lost jobs, recovers dead workers' jobs (``mmq requeue``);
- ``deadletter``: messages that are not valid tasks, kept with their reason;
- ``stats``: the job count a worker adds to Celery's ``stats`` broadcast.
"""
