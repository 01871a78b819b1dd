"""Model files: the shared ViT backbone (vit.py), mask builders (masks.py) and one file per method.
Importing this package registers every method, its presets and its checkpoint converter."""
# One import per method file; each registers itself in models.registry.
from . import digpt, mae, saim, scala, xtra  # noqa: F401
