"""The pyfunc flavour, driven through MLflow's own client: `mlflow.pyfunc.load_model(
"models:/dsv3-chat@candidate").predict([...])` returns the text DeepSeekV3.generate produces,
loads with the network blocked, and carries a signature with params and a serving example."""

import json
import socket

import mlflow
import pytest
import torch

from dsv3 import tracking


def greedy_text(hf_dir, prompt: str, n: int, chat: bool) -> str:
    """Reference: tokenise the rendered template (or BOS + text), generate, cut at EOS."""
    from dsv3 import DeepSeekV3
    from dsv3.data.tokenizer import BOS, load_tokenizer
    from dsv3.data.chat import prompt_messages, render

    tok = load_tokenizer(hf_dir)
    text = render(prompt_messages(prompt), add_generation_prompt=True) if chat else BOS + prompt
    ids = tok(text, add_special_tokens=False)["input_ids"]
    out = DeepSeekV3.from_pretrained(hf_dir).generate(torch.tensor([ids]), n, eos_token_id=tok.eos_token_id)
    new = out[0, len(ids):].tolist()
    new = new[:new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
    return tok.decode(new, skip_special_tokens=True)


PROMPTS = ["2+3=", "The quick brown fox", "def add(a, b):"]


def test_load_model_predict_equals_greedy_generate(chain):
    chat = mlflow.pyfunc.load_model("models:/dsv3-chat@candidate")
    got = chat.predict(PROMPTS, params={"max_new_tokens": 12})
    assert got == [greedy_text(chain["dirs"]["chat"], p, 12, chat=True) for p in PROMPTS]
    assert all(isinstance(t, str) for t in got) and any(got)
    one = chat.predict(["2+3="])  # signature defaults: 64 new tokens, greedy, chat template
    assert one == [greedy_text(chain["dirs"]["chat"], "2+3=", 64, chat=True)]
    # a base model continues raw text (no chat template) unless asked
    base = mlflow.pyfunc.load_model(f"models:/dsv3-base/{chain['models']['base'].version}")
    assert base.predict(PROMPTS[:2], params={"max_new_tokens": 8}) == [
        greedy_text(chain["dirs"]["base"], p, 8, chat=False) for p in PROMPTS[:2]]
    assert base.predict(["2+3="], params={"max_new_tokens": 8, "chat": True}) == [
        greedy_text(chain["dirs"]["base"], "2+3=", 8, chat=True)]


def test_input_forms_sampling_and_serving_payloads(chain, tmp_path):
    import pandas as pd

    uri = "models:/dsv3-chat@candidate"
    m = mlflow.pyfunc.load_model(uri)
    ref = m.predict(PROMPTS, params={"max_new_tokens": 6})
    assert m.predict(pd.DataFrame({"prompt": PROMPTS}), params={"max_new_tokens": 6}) == ref
    assert m.predict(pd.Series(PROMPTS), params={"max_new_tokens": 6}) == ref
    p = {"max_new_tokens": 10, "temperature": 1.5}
    draws = [m.predict(["2+3="], params={**p, "seed": s})[0] for s in range(4)]
    assert draws[0] == m.predict(["2+3="], params={**p, "seed": 0})[0]  # seeded
    assert len(set(draws)) > 1
    # `mlflow models predict` / `serve` JSON payloads (the scoring server's parser), params included
    for i, payload in enumerate(({"inputs": PROMPTS, "params": {"max_new_tokens": 6}},
                                 {"dataframe_split": {"columns": ["prompt"], "data": [[x] for x in PROMPTS]},
                                  "params": {"max_new_tokens": 6}})):
        inp, out = tmp_path / f"in{i}.json", tmp_path / f"out{i}.json"
        inp.write_text(json.dumps(payload))
        mlflow.models.predict(uri, input_path=str(inp), content_type="json", env_manager="local", output_path=str(out))
        assert json.loads(out.read_text()) == {"predictions": ref}


def test_signature_example_and_no_pickle(chain):
    from mlflow.models import get_model_info

    info = get_model_info("models:/dsv3-chat@candidate")
    sig = info.signature
    assert [c.type.name for c in sig.inputs.inputs] == ["string"]
    assert [c.name for c in sig.outputs.inputs] == ["text"]
    params = {p.name: p.default for p in sig.params.params}
    assert params == {"max_new_tokens": 64, "temperature": 0.0, "top_p": 1.0, "seed": 0, "chat": True}
    assert {p.name: p.default for p in get_model_info("models:/dsv3-base@candidate").signature.params}["chat"] is False
    pf = info.flavors["python_function"]
    assert pf["loader_module"] == "mlflow.pyfunc.loaders.code_model"  # models from code, not a pickle
    assert info.saved_input_example_info["serving_input_path"] == "serving_input_example.json"
    root = tracking.resolve_model_uri("models:/dsv3-chat@candidate").rsplit("/artifacts/", 1)[0]
    import os

    files = set(os.listdir(root))
    assert {"MLmodel", "_pyfunc_entry.py", "requirements.txt", "serving_input_example.json"} <= files
    assert not [f for f in files if f.endswith(".pkl")]
    reqs = open(os.path.join(root, "requirements.txt")).read()
    assert f"torch=={torch.__version__.split('+')[0]}" in reqs


def test_loads_and_predicts_with_the_network_blocked(chain, monkeypatch):
    real_connect = socket.socket.connect

    def no_network(self, addr):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise OSError(f"network blocked in this test: connect to {addr}")
        return real_connect(self, addr)

    monkeypatch.setattr(socket.socket, "connect", no_network)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)  # offline by construction, not by a hub flag
    m = tracking.load_pyfunc("models:/dsv3-long@candidate", model_config={"batch_size": 2})
    out = m.predict(PROMPTS, params={"max_new_tokens": 5})
    assert out == [greedy_text(chain["dirs"]["long"], p, 5, chat=False) for p in PROMPTS]
    with pytest.raises(OSError, match="network blocked"):
        socket.create_connection(("127.0.0.1", 9), timeout=1)
