"""An example forseti_celery project: chat rooms and sensor pollers as keyed processes.

``example_project.app`` is the Celery app the workers run; ``python -m example_project.demo``
starts three of them and walks through the API.
"""
