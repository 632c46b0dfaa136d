"""h2o-cache: Heavy-Hitter Oracle KV-cache eviction (and hot/cold FFN offload) for Hugging Face transformers."""

__version__ = "0.1.0"
