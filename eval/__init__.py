"""Evaluation layer of h2o-cache: quality, throughput, lm-eval and offload benchmarks on one kernel
(``caches``, ``texts``, ``memory``, ``h2o_cache.runner``).

Importing it registers the ``h2o`` model in lm-eval's registry when lm-eval is installed (the ``eval`` extra);
without lm-eval nothing is registered and ``h2o-cache lm-eval`` says what to install.
"""

import importlib.util as _util

if _util.find_spec("lm_eval") is not None:
    from .lm_eval_model import register as _register

    _register()
