"""The layer every other one builds on: errors, settings, the wire protocol and its codec, the
broker plumbing, message signing, and the two values users hold (``KeyRef``, ``KeyedProcess``).

Imports nothing from ``forseti_celery`` above it (see the Code map in docs/design.rst).
"""
