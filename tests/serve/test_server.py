"""The OpenAI-compatible server through the official `openai` client (and raw HTTP for what a
client library cannot send): completions (echo + logprobs), chat with post-training's
template, streaming, stop strings, several prompts / choices, disconnect mid-stream, 429 on a
full queue, 4xx on bad requests, /v1/models, /health, /metrics."""

import json
import re
import time

import httpx
import openai
import pytest
import torch

from dsv3 import DeepSeekV3
from dsv3.data.chat import apply_chat_template, decode_response
from dsv3.serve.config import ServeConfig
from dsv3.serve.server import Server


@pytest.fixture(scope="module")
def server(tiny_dir):
    srv = Server(ServeConfig(model=str(tiny_dir), port=0, block_size=8, cache_tokens=8192, max_batch=8))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def ref(tiny_dir):
    return DeepSeekV3.from_pretrained(tiny_dir).eval()


def _metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics").text
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def _greedy_text(ref, tok, ids, n):
    return tok.decode(ref.generate(torch.tensor([ids]), n)[0, len(ids):].tolist(), skip_special_tokens=True)


def test_completion_with_echo_and_logprobs(client, server, ref):
    tok = server.engine.tok
    prompt = "Hello, how are you"
    ids = tok.encode(prompt)
    r = client.completions.create(model=server.name, prompt=prompt, max_tokens=8, temperature=0, logprobs=3,
                                  echo=True, extra_body={"ignore_eos": True})
    c = r.choices[0]
    assert c.text == prompt + _greedy_text(ref, tok, ids, 8) and c.finish_reason == "length"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 8
    lp = c.logprobs
    assert len(lp.token_logprobs) == len(ids) + 8 and lp.token_logprobs[0] is None
    with torch.no_grad():
        want = torch.log_softmax(ref(torch.tensor([ids])).logits[0, :-1], -1)
    for i in range(1, len(ids)):  # prompt log-probabilities are the model's
        assert abs(lp.token_logprobs[i] - float(want[i - 1, ids[i]])) < 1e-4
        assert len(lp.top_logprobs[i]) == 3 and max(lp.top_logprobs[i].values()) >= lp.token_logprobs[i] - 1e-6
    gen_lp = lp.token_logprobs[len(ids):]
    assert all(max(t.values()) == v for t, v in zip(lp.top_logprobs[len(ids):], gen_lp))  # greedy = top-1


def test_chat_uses_the_post_training_template(client, server, ref):
    tok = server.engine.tok
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How are you today?"}]
    r = client.chat.completions.create(model=server.name, messages=msgs, max_tokens=10, temperature=0)
    ids = apply_chat_template(tok, msgs, add_generation_prompt=True)
    gen = ref.generate(torch.tensor([ids]), 10, eos_token_id=tok.eos_token_id)[0, len(ids):].tolist()
    assert r.choices[0].message.content == decode_response(tok, gen)
    assert r.choices[0].message.role == "assistant" and r.usage.prompt_tokens == len(ids)


def test_streaming_equals_non_streaming(client, server):
    kw = dict(model=server.name, prompt="The quick brown fox", max_tokens=12, temperature=0,
              extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12
    msgs = [{"role": "user", "content": "Hi"}]
    chat = client.chat.completions.create(model=server.name, messages=msgs, max_tokens=8, temperature=0)
    parts = list(client.chat.completions.create(model=server.name, messages=msgs, max_tokens=8, temperature=0,
                                                stream=True))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == chat.choices[0].message.content


def test_stop_strings(client, server):
    kw = dict(model=server.name, prompt="Hello, how are you", max_tokens=16, temperature=0,
              extra_body={"ignore_eos": True})
    text = client.completions.create(**kw).choices[0].text
    stop = text[6:8]
    r = client.completions.create(stop=[stop, "@@@"], **kw).choices[0]
    assert r.finish_reason == "stop" and r.text == text[:text.find(stop)]
    streamed = "".join(c.choices[0].text for c in client.completions.create(stop=stop, stream=True, **kw))
    assert streamed == r.text


def test_several_prompts_and_choices(client, server, ref):
    tok = server.engine.tok
    a, b = tok.encode("Hello there"), tok.encode("def add(a, b):")
    r = client.completions.create(model=server.name, prompt=[a, b], max_tokens=6, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [_greedy_text(ref, tok, a, 6), _greedy_text(ref, tok, b, 6)]
    kw = dict(model=server.name, prompt="Hello", max_tokens=8, temperature=1.0, n=2, seed=3,
              extra_body={"ignore_eos": True})
    one, two = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in one.choices] == [c.text for c in two.choices]  # seeded
    assert one.choices[0].text != one.choices[1].text


def test_disconnect_mid_stream_frees_the_cache(client, server):
    aborted = _metric(server.url, 'dsv3_requests_total{finish_reason="abort"}')
    stream = client.completions.create(model=server.name, prompt="Hello", max_tokens=400, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    it = iter(stream)
    next(it), next(it)
    assert _metric(server.url, "dsv3_running_sequences") == 1
    assert _metric(server.url, "dsv3_cache_blocks_used") > 0
    stream.close()
    t0 = time.time()
    while _metric(server.url, "dsv3_cache_blocks_used") > 0 and time.time() - t0 < 60:
        time.sleep(0.05)
    assert _metric(server.url, "dsv3_cache_blocks_used") == 0
    assert _metric(server.url, "dsv3_running_sequences") == 0
    assert _metric(server.url, 'dsv3_requests_total{finish_reason="abort"}') == aborted + 1


def test_bad_requests(client, server):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="limit of 511"):
        client.completions.create(model=server.name, prompt="Hello " * 600, max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="maximum context length is 512"):
        client.completions.create(model=server.name, prompt="Hello", max_tokens=600)
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.completions.create(model=server.name, prompt="x", logit_bias={"1": 5})
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=server.name, prompt="x", max_tokens=-1)
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model=server.name, messages=[{"role": "wizard", "content": "x"}])
    r = httpx.post(server.url + "/v1/completions", content=b'{"prompt": "x", ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/chat/completions", content=b"[1, 2]")
    assert r.status_code == 400 and "object" in r.json()["error"]["message"]


def test_models_health_metrics(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == [server.name] and models[0].max_model_len == 512
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    text = httpx.get(server.url + "/metrics").text
    for name in ("dsv3_queue_depth", "dsv3_running_sequences", "dsv3_time_to_first_token_seconds_bucket",
                 "dsv3_time_per_output_token_seconds_bucket", "dsv3_generation_tokens_total"):
        assert name in text
    assert _metric(server.url, "dsv3_time_to_first_token_seconds_count") >= 1


def test_429_when_the_queue_is_full(tiny_dir):
    cfg = ServeConfig(model=str(tiny_dir), port=0, block_size=8, cache_tokens=4096, max_batch=1, max_queue=1)
    with Server(cfg) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        kw = dict(model=srv.name, prompt="Hello", max_tokens=300, temperature=0, stream=True,
                  extra_body={"ignore_eos": True})
        running = c.completions.create(**kw)
        next(iter(running))
        queued = c.completions.create(**kw)
        t0 = time.time()
        while _metric(srv.url, "dsv3_queue_depth") < 1 and time.time() - t0 < 30:
            time.sleep(0.02)
        with pytest.raises(openai.RateLimitError, match="queue is full"):
            c.completions.create(model=srv.name, prompt="Hello", max_tokens=2)
        assert _metric(srv.url, "dsv3_rejected_requests_total") == 1
        running.close()
        queued.close()
        body = json.loads(httpx.get(srv.url + "/health").text)
        assert body["status"] == "ok"
