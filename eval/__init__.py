"""Evaluation layer of h2o-cache: quality, throughput, lm-eval and offload benchmarks on one kernel
(``caches``, ``texts``, ``memory``, ``h2o_cache.runner``).

Importing it registers the ``h2o`` model in lm-eval's registry when lm-eval is installed (the ``eval`` extra);
without lm-eval nothing is registered and ``h2o-cache lm-eval`` says what to install.
"""

try:
    from .lm_eval_model import register as _register
except ModuleNotFoundError as _err:
    if _err.name is None or _err.name.split(".")[0] != "lm_eval":
        raise
else:
    _register()
