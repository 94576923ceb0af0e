"""Sphinx configuration of the forseti_celery docs.

Build: ``make docs`` or ``tox -e docs`` (``sphinx-build -W -b html docs docs/_build/html``).
Only the theme and extensions that ship with Sphinx: nothing is downloaded at build time.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Autodoc imports the package from this checkout (no broker is needed to import it).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import forseti_celery

project = "forseti_celery"
author = "forseti_celery contributors"
copyright = "forseti_celery contributors"
release = forseti_celery.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
]

root_doc = "index"
exclude_patterns = ["_build", "requirements.txt"]
templates_path: list[str] = []
html_static_path = ["_static"]

html_theme = "alabaster"
html_title = f"forseti_celery {release}"
html_theme_options = {
    "description": "One long-lived keyed process per key across a cluster of Celery workers.",
    "fixed_sidebar": True,
    "show_relbars": True,
}

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {
    "members": True,
}

pygments_style = "sphinx"
