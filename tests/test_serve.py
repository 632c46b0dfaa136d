"""``h2o-cache serve`` end to end on localhost: a real OpenAI client against a server subprocess.

One server for the module (a tiny random Llama with a byte-level tokenizer and a chat template, saved to tmp),
H2O at 10% + 10% by default. The expected texts come from ``generate`` in this process on the same model, so the
test knows the server really compressed (H2O's answer differs from the full cache's here).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import tiny_llama_config
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

MESSAGES = [{"role": "user", "content": "Tell me about the heavy hitter oracle. " * 6}]
NEW_TOKENS = 8
H2O = {"heavy_ratio": 0.1, "recent_ratio": 0.1}


def _save_tiny_chat_model(folder) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = ["<pad>", "<s>", "</s>"]
    vocab = {token: i for i, token in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>")
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant: {% endif %}")
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=len(vocab), max_position_embeddings=2048))
    model.generation_config.eos_token_id = None  # always generate NEW_TOKENS tokens
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("served") / "tiny"
    _save_tiny_chat_model(folder)
    port = _free_loopback_port()
    log = open(folder.parent / "server.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "h2o_cache.cli", "serve", "--model", str(folder), "--host", "127.0.0.1",
         "--port", str(port), "--heavy-ratio", str(H2O["heavy_ratio"]), "--recent-ratio", str(H2O["recent_ratio"])],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"server did not start:\n{log.read()[-3000:]}")
            time.sleep(0.2)
        yield {"base": base, "folder": folder, "proc": proc}
    finally:
        proc.kill()
        proc.wait(timeout=10)
        log.close()


@pytest.fixture(scope="module")
def expected(server):
    """Greedy continuations computed here: H2O at the server's default budget, and the full cache."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(server["folder"])
    model = LlamaForCausalLM.from_pretrained(server["folder"]).eval()
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    texts = {}
    for name, options in (("h2o", dict(cache_implementation="h2o", cache_config=H2O)), ("full", {})):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                             **options)
        texts[name] = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert texts["h2o"] != texts["full"], "the test needs a prompt where H2O changes the answer"
    return texts


def _client(server):
    return openai.OpenAI(base_url=server["base"] + "/v1", api_key="unused", timeout=30, max_retries=0)


def _chat(server, **extra):
    reply = _client(server).chat.completions.create(model=str(server["folder"]), messages=MESSAGES,
                                                    max_tokens=NEW_TOKENS, temperature=0, **extra)
    return reply.choices[0].message.content


def test_chat_completion_uses_h2o_by_default(server, expected):
    assert _chat(server) == expected["h2o"]


def test_per_request_generation_config(server, expected):
    # generate fills fields a request leaves unset from the model's default (H2O here): name the full cache
    full = json.dumps({"max_new_tokens": NEW_TOKENS, "do_sample": False, "cache_implementation": "dynamic"})
    assert _chat(server, extra_body={"generation_config": full}) == expected["full"]
    h2o = json.dumps({"max_new_tokens": NEW_TOKENS, "do_sample": False, "cache_implementation": "h2o",
                      "cache_config": H2O})
    assert _chat(server, extra_body={"generation_config": h2o}) == expected["h2o"]


def test_streaming(server, expected):
    stream = _client(server).chat.completions.create(model=str(server["folder"]), messages=MESSAGES,
                                                     max_tokens=NEW_TOKENS, temperature=0, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == expected["h2o"]


def test_two_concurrent_requests(server, expected):
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda _: _chat(server), range(2)))
    assert answers == [expected["h2o"]] * 2


def test_bad_request_is_a_4xx_and_the_server_keeps_running(server, expected):
    bad = json.dumps({"cache_implementation": "h2o", "cache_config": {"heavy_ratio": 0.1, "bogus": 1}})
    with pytest.raises(openai.BadRequestError) as err:
        _chat(server, extra_body={"generation_config": bad})
    assert "cache_config: unknown option(s) ['bogus']" in err.value.response.json()["detail"]
    invalid = json.dumps({"cache_implementation": "h2o", "cache_config": {"policy": "nope"}})
    with pytest.raises(openai.BadRequestError) as err:
        _chat(server, extra_body={"generation_config": invalid})
    assert "policy='nope' is not supported" in err.value.response.json()["detail"]
    assert server["proc"].poll() is None
    assert _chat(server) == expected["h2o"]
