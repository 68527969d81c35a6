"""Search over stored predictions: every prediction's embedding lives in one space
shared by text, images and speech, so any query finds any modality.

``SearchEngine`` (engine.py) keeps the vectors in memory per embedding space
(shard.py), searches them exactly in chunks, and past ``MMQ_SEARCH_ANN_MIN`` vectors
through an HNSW index (ann.py). The query's embedding comes from the model, through
a short job (producer/sdk/search.py); this package never imports torch.
"""

from core.search.engine import SearchConfig, SearchEngine
from core.search.types import (
    SEARCH_QUERY_PARAM,
    SearchFilters,
    SearchHit,
    SearchStats,
    is_search_query,
)

__all__ = ["SEARCH_QUERY_PARAM", "SearchConfig", "SearchEngine", "SearchFilters", "SearchHit",
           "SearchStats", "is_search_query"]
