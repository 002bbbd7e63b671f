"""Pictures seen by CLIP: the vision tower (tower.py), AltCLIP-m9 (altclip.py), the safety checker
(safety.py) and the CLIP score (score.py). Importing it registers the model-folder modules it holds."""
from . import altclip, safety  # noqa: F401  (each registers its module with storage.folder)
