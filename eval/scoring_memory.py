"""Peak memory of scoring a prompt: H2O's chunked path vs the materialised attention matrix.

H2O needs the column sums of a prompt's causal softmax. Materialising it (what eager attention does) costs
O(L^2) memory per layer; the chunked path of ``h2o_cache.scoring`` costs O(L x chunk). This script measures the
peak process RSS added by each, for growing prompt lengths, with SmolLM2-135M's attention shapes
(9 query heads, 3 KV heads, head_dim 64), and prints a markdown table.

    python -m h2o_cache.eval.scoring_memory --lengths 1024,2048,4096,8192
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from h2o_cache.config import DEFAULT_PREFILL_CHUNK_BYTES
from h2o_cache.scoring import attention_with_mass, chunk_size_for, mass_from_weights

from .memory import current_rss_bytes, peak_memory_bytes, reset_peak_memory
from .report import markdown_table


def _peak_added(fn) -> float:
    """MiB of peak RSS above the RSS before ``fn`` ran."""
    reset_peak_memory()
    before = current_rss_bytes()
    fn()
    return (peak_memory_bytes(torch.device("cpu")) - before) / 2**20


def measure(length: int, batch: int, query_heads: int, kv_heads: int, dim: int, chunk_bytes: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(batch, query_heads, length, dim, generator=gen)
    k = torch.randn(batch, kv_heads, length, dim, generator=gen)
    v = torch.randn(batch, kv_heads, length, dim, generator=gen)
    scaling = dim**-0.5
    chunk = chunk_size_for(batch, query_heads, length, chunk_bytes)
    inputs_mib = 3 * q.nbytes / 2**20

    def eager():
        groups = query_heads // kv_heads
        logits = q @ k.repeat_interleave(groups, 1).transpose(-1, -2) * scaling
        causal = torch.ones(length, length, dtype=torch.bool).triu_(1)
        probs = logits.masked_fill_(causal, float("-inf")).softmax(-1)
        return mass_from_weights(probs, kv_heads, None, "mean")

    def scores_only():  # beside a backend that computed the output (padded prompts, GPUs)
        return attention_with_mass(q, k, None, scaling=scaling, chunk_size=chunk)[1]

    def output_and_scores():  # the single pass of an unpadded prompt on CPU
        return attention_with_mass(q, k, v, scaling=scaling, chunk_size=chunk)

    row = {"prompt tokens": length, "chunk": chunk, "inputs MiB": round(inputs_mib, 1)}
    row["chunked, scores only, MiB"] = round(_peak_added(scores_only), 1)
    row["chunked, output + scores, MiB"] = round(_peak_added(output_and_scores), 1)
    row["materialised MiB"] = round(_peak_added(eager), 1)
    return row


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="1024,2048,4096,8192", help="comma-separated prompt lengths")
    parser.add_argument("--batch", type=int, default=1, help="sequences")
    parser.add_argument("--query-heads", type=int, default=9, help="query heads (SmolLM2: 9)")
    parser.add_argument("--kv-heads", type=int, default=3, help="KV heads (SmolLM2: 3)")
    parser.add_argument("--head-dim", type=int, default=64, help="head dimension (SmolLM2: 64)")
    parser.add_argument("--chunk-bytes", type=int, default=DEFAULT_PREFILL_CHUNK_BYTES,
                        help="target bytes of one chunk's attention block (H2OConfig.prefill_chunk_bytes)")
    args = parser.parse_args(argv)
    if not reset_peak_memory():
        raise SystemExit("needs Linux /proc/self/clear_refs to reset the peak RSS")
    rows = [measure(int(n), args.batch, args.query_heads, args.kv_heads, args.head_dim, args.chunk_bytes)
            for n in args.lengths.split(",")]
    print(markdown_table(rows, list(rows[0])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
