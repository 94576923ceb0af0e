"""What runs in a Celery worker: the bootstep, the node, the leader, election, membership, events,
remote control, and the pool of keyed processes. Never imports the client or the facade.
"""
