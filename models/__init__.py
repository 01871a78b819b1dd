"""Model files: the shared ViT backbone (vit.py), mask builders (masks.py) and one file per method.
Importing this package registers every pretraining preset and checkpoint converter."""
# One import per method file; each registers its presets/converters in models.registry.
from . import digpt, saim, scala, xtra  # noqa: F401
