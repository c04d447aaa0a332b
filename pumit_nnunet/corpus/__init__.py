"""The pre-training corpus: catalog, conversion, crop store + manifest, bucketed sampler and loader, as in the PUMIT paper.

Heavy imports (torch) live in ``loader``/``augment``; import those modules directly when you need them.
"""

from pumit_nnunet.corpus.catalog import Catalog, DatasetSpec, duplicate_group_weight, load_catalog
from pumit_nnunet.corpus.sampler import MIM_CROP, TOKENIZER_CROP, CropGrid

__all__ = ["Catalog", "DatasetSpec", "duplicate_group_weight", "load_catalog", "CropGrid", "TOKENIZER_CROP", "MIM_CROP"]
