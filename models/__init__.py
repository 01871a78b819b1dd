"""Model files: the shared ViT backbone (vit.py), mask builders (masks.py) and one file per method.
Importing this package registers every pretraining preset and checkpoint converter."""
# One import per method file; each registers its presets/converters in models.registry.
from . import xtra  # noqa: F401
from . import scala  # noqa: F401
from . import digpt  # noqa: F401
from . import saim  # noqa: F401
