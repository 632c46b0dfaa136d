"""Hot/cold FFN neuron offload (PowerInfer-style) through Accelerate device maps, plus layer streaming.

Typical use::

    from h2o_cache import offload
    prof = offload.profile(model, offload.token_windows(tok, offload.read_texts(), 256, 16384))
    plan = offload.place(prof, budget_bytes=int(0.3 * prof.ffn_bytes()))
    offload.dispatch(model, plan, max_memory={0: "1GiB", "cpu": "16GiB"})
    ...
    offload.restore(model)
"""

from .hotcold import HotColdMLP, dispatch, placement_report, restore, set_mode
from .placement import PlacementPlan, capture_curve, place, plot_capture_curve
from .profiler import NeuronProfile, profile, read_texts, token_windows
from .sparse import calibrate_thresholds, measured_sparsity
from .streaming import LayerStreamer, stream_layers

__all__ = [
    "HotColdMLP",
    "LayerStreamer",
    "NeuronProfile",
    "PlacementPlan",
    "calibrate_thresholds",
    "capture_curve",
    "dispatch",
    "measured_sparsity",
    "place",
    "placement_report",
    "plot_capture_curve",
    "profile",
    "read_texts",
    "restore",
    "set_mode",
    "stream_layers",
    "token_windows",
]
