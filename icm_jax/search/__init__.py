"""ICM search: consistency I(D), annealing (Alg. 1) with consistency fix (Alg. 2)."""

from icm_jax.search.annealing import ICMSearch, SearchError, SearchResult
from icm_jax.search.batches import split_into_batches
from icm_jax.search.config import SearchConfig
from icm_jax.search.consistency import Consistency

__all__ = ["Consistency", "ICMSearch", "SearchConfig", "SearchError",
           "SearchResult", "split_into_batches"]
