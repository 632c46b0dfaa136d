"""Memory per request of `h2o-cache serve`, with and without H2O, at a long prompt (a benchmark: prints figures).

    python examples/serve_memory.py                        # embedded SmolLM2-135M, ~3000-token prompt
    python examples/serve_memory.py --prompt-tokens 4096 --max-tokens 16

Starts the server in this process on 127.0.0.1 (H2O 10% + 10% by default), then sends the same long chat request
through the OpenAI client, alternately with the server's H2O default and with
``generation_config={"cache_implementation": "dynamic"}`` (the full cache). Per request it prints the KV bytes the
request's cache held at the end (read from the cache object the model's forward received) and the peak rise of
the process RSS during the request (sampled every 5 ms; includes activations and allocator effects).
"""

import argparse
import json
import socket
import threading
import time

import openai
import psutil

from h2o_cache.config import H2OConfig
from h2o_cache.models import load_model, reference_text
from h2o_cache.serving import default_model_folder, start_server

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default=None, help="saved model folder (default: the embedded SmolLM2)")
parser.add_argument("--prompt-tokens", type=int, default=3000, help="about this many prompt tokens")
parser.add_argument("--max-tokens", type=int, default=16, help="tokens to generate per request")
parser.add_argument("--repeats", type=int, default=1, help="request pairs (H2O, full)")
args = parser.parse_args()

folder = args.model or str(default_model_folder())
_, tokenizer = load_model(folder)
text = reference_text()
ids = tokenizer(text[: args.prompt_tokens * 8]).input_ids[: args.prompt_tokens]
messages = [{"role": "user", "content": tokenizer.decode(ids) + "\n\nSummarise the text above in one sentence."}]

with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
server = start_server(folder, h2o=H2OConfig(heavy_ratio=0.1, recent_ratio=0.1), port=port)
model = next(iter(server._model_manager.loaded_models.values())).model
last_cache = {}
model.register_forward_pre_hook(
    lambda module, a, kw: last_cache.update(cache=kw.get("past_key_values") or kw.get("cache")), with_kwargs=True)


def kv_bytes(cache) -> int:
    if hasattr(cache, "kv_bytes"):
        return cache.kv_bytes()
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def measure(label: str, extra_body: dict) -> None:
    process = psutil.Process()
    base = process.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.perf_counter()
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=600, max_retries=0)
    reply = client.chat.completions.create(model=folder, messages=messages, max_tokens=args.max_tokens,
                                           temperature=0, extra_body=extra_body)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    cache = last_cache["cache"]
    print(f"{label:<6} prompt {reply.usage.prompt_tokens:>5} tok  cache {type(cache).__name__:<12} "
          f"KV {kv_bytes(cache) / 2**20:7.2f} MiB  RSS peak rise {(peak[0] - base) / 2**20:7.1f} MiB  "
          f"{seconds:5.1f} s")


try:
    full = {"generation_config": json.dumps({"cache_implementation": "dynamic", "do_sample": False,
                                             "max_new_tokens": args.max_tokens})}
    for _ in range(args.repeats):
        measure("H2O", {})
        measure("full", full)
finally:
    server.kill_server()
