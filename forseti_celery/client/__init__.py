"""What a process that asks for keys runs: requests to the leader and to keyed processes, and the
cache of live refs. Never imports the worker or the child side.
"""
