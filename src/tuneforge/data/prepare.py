"""`prepare_splits`: the recipe's splits exactly as training sees them, from the
data studio pipeline (data/studio.py: load, clean, PII, dedup, near-dup, split,
balance, augment). The split types live in data/splits.py.
"""

from __future__ import annotations

from tuneforge.data.splits import Splits
from tuneforge.data.studio import prepare_data


def prepare_splits(recipe) -> Splits:
    """The recipe's train/validation/test rows, exactly as training sees them:
    the data studio pipeline (data/studio.py), cached by content hash. Raises
    InvalidRows listing every malformed row unless data.on_invalid is 'skip'.
    Evaluation, export and audits call this too, so they see the same splits."""
    return prepare_data(recipe)
