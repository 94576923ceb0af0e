"""Benchmarks of forseti_celery against a plain Celery task and Ray named actors (``make bench``)."""
