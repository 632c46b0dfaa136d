"""Every decoder family H2O claims, on tiny random models, with the sdpa and eager backends.

Per family: exactness at a budget covering everything (greedy tokens identical to ``DynamicCache``, logits within
1e-5 in fp32) and a run with real eviction at a 20% budget (stored size equals the budget; the two backends
evict the same tokens, so their outputs agree). Models H2O cannot serve are refused with a clear ``ValueError``.
``tests/support_matrix.py`` turns these same checks into docs/SUPPORT.md.
"""

from __future__ import annotations

import pytest
import torch
from fixtures import BACKENDS, FAMILIES, REFUSED, check_eviction, check_exact, max_logit_diff, prompt_ids


@pytest.mark.parametrize("attn", BACKENDS)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_exact_at_full_budget(family, attn):
    check_exact(family, attn)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_eviction_at_20_percent_budget_same_on_both_backends(family):
    sdpa, eager = (check_eviction(family, attn) for attn in BACKENDS)
    # Both backends score with the same arithmetic, so they evict the same tokens.
    assert torch.equal(sdpa.sequences, eager.sequences)
    assert max_logit_diff(sdpa, eager) < 1e-4


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_unsupported_models_are_refused_before_generating(name):
    build, message = REFUSED[name]
    torch.manual_seed(0)
    model = build().eval()
    with pytest.raises(ValueError, match=message):
        model.generate(prompt_ids(1, 12), max_new_tokens=2, cache_implementation="h2o")
