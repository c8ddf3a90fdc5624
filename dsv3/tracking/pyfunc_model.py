"""The MLflow `pyfunc` flavour of a dsv3 stage model: text in, generated text out.

    mlflow.pyfunc.load_model("models:/dsv3-chat@champion").predict(["2+3="])  # -> ["5"]

Design choices
- Models from code (MLflow's recommended form since 2.12): the logged model's python model is
  the small script `_pyfunc_entry.py` (copied into the model), not a cloudpickle, so loading runs
  reviewed code, never a pickle. It needs the `dsv3` package importable (this repository
  installed); torch / transformers / tokenizers / safetensors pins go to requirements.txt.
- The HF-format directory (config.json, *.safetensors, tokenizer.json) is the model's artifact
  `hf`; `load_context` reads it with `DeepSeekV3.from_pretrained` + `load_tokenizer`: local
  files only, so a model loads offline. The same directory is what a later stage trains from
  (`dsv3.tracking.resolve_model_uri("models:/dsv3-long@candidate")`).
- Signature: input one string column `prompt` (a list of strings, a pandas Series or
  DataFrame all work); params `max_new_tokens`, `temperature`, `top_p`, `seed`, `chat` with
  defaults; output one string column `text`, the continuation cut at the first EOS with
  special tokens removed.
- `chat` (default true for a post-trained model): each prompt is one user turn in the
  DeepSeek-V3 chat template (§5.1) ending in `<｜Assistant｜>`; otherwise a document
  continuation `BOS + prompt`, the framing pretraining shards use.
- Prompts of one call go through `DeepSeekV3.generate` in left-padded batches of
  `batch_size` (attention_mask makes positions as if unpadded); temperature 0 is greedy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

HF_ARTIFACT = "hf"  # key of the HF directory in the model's artifacts (artifacts/hf/)
ENTRY = Path(__file__).with_name("_pyfunc_entry.py")
DEFAULTS = {"max_new_tokens": 64, "temperature": 0.0, "top_p": 1.0, "seed": 0}


def signature(chat: bool) -> ModelSignature:
    params = ParamSchema([ParamSpec("max_new_tokens", "long", DEFAULTS["max_new_tokens"]),
                          ParamSpec("temperature", "double", DEFAULTS["temperature"]),
                          ParamSpec("top_p", "double", DEFAULTS["top_p"]),
                          ParamSpec("seed", "long", DEFAULTS["seed"]),
                          ParamSpec("chat", "boolean", bool(chat))])
    return ModelSignature(inputs=Schema([ColSpec("string")]),
                          outputs=Schema([ColSpec("string", "text")]), params=params)


def _prompts(model_input: Any) -> list[str]:
    """A list of prompt strings from what pyfunc passes (DataFrame after schema enforcement)."""
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "columns"):  # pandas DataFrame
        col = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        return [str(x) for x in model_input[col].tolist()]
    if isinstance(model_input, dict):
        v = model_input.get("prompt", next(iter(model_input.values()), []))
        return [v] if isinstance(v, str) else [str(x) for x in v]
    if hasattr(model_input, "tolist"):
        model_input = model_input.tolist()
    return [x if isinstance(x, str) else str(x.get("prompt", "")) if isinstance(x, dict) else str(x)
            for x in model_input]


class DSV3TextGenerator(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper around DeepSeekV3.generate and the checkpoint's tokenizer."""

    def load_context(self, context) -> None:
        import torch

        from dsv3.data.tokenizer import load_tokenizer
        from dsv3.model.transformer import DeepSeekV3

        cfg = dict(context.model_config or {})
        path = context.artifacts[HF_ARTIFACT]
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                 "float16": torch.float16}[cfg.get("dtype", "float32")]
        device = cfg.get("device") or "cpu"
        self.model = DeepSeekV3.from_pretrained(path, dtype=dtype, device=device).eval()
        self.tok = load_tokenizer(path)
        self.batch_size = int(cfg.get("batch_size", 8))
        self.default_chat = bool(cfg.get("chat", False))

    def encode(self, prompt: str, chat: bool) -> list[int]:
        from dsv3.data.chat import encode_chat, prompt_messages

        if chat:
            return encode_chat(self.tok, prompt_messages(prompt), add_generation_prompt=True)[0]
        return [self.tok.bos_token_id] + self.tok.encode(prompt, add_special_tokens=False)

    def generate(self, prompts: list[str], max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, chat: bool | None = None) -> list[str]:
        import torch

        from dsv3.data.chat import decode_response

        chat = self.default_chat if chat is None else chat
        g = torch.Generator(device=self.model.device).manual_seed(int(seed))
        pad = self.tok.pad_token_id
        out: list[str] = []
        for i in range(0, len(prompts), self.batch_size):
            ids = [self.encode(p, chat) for p in prompts[i:i + self.batch_size]]
            S = max(map(len, ids))
            x = torch.tensor([[pad] * (S - len(r)) + r for r in ids], device=self.model.device)  # [B,S]
            mask = torch.tensor([[0] * (S - len(r)) + [1] * len(r) for r in ids], device=self.model.device)
            y = self.model.generate(x, int(max_new_tokens), temperature=float(temperature), top_p=float(top_p),
                                    eos_token_id=self.tok.eos_token_id, attention_mask=mask, generator=g)
            out += [decode_response(self.tok, row[S:].tolist()) for row in y]
        return out

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list[str]:
        p = {**DEFAULTS, "chat": self.default_chat, **(params or {})}
        return self.generate(_prompts(model_input), p["max_new_tokens"], p["temperature"], p["top_p"],
                             p["seed"], p["chat"])


def requirements() -> list[str]:
    """Pins of what the model code imports (no pip inference: it would load the model again)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in ("mlflow", "torch", "transformers", "tokenizers", "safetensors", "pandas"):
        try:
            out.append(f"{pkg}=={version(pkg).split('+')[0]}")
        except PackageNotFoundError:
            out.append(pkg)
    return out


def check_hf_dir(model_dir: str | Path) -> Path:
    """The directory, or a FileNotFoundError naming what a stage model lacks."""
    d = Path(model_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"stage model directory {d} does not exist")
    missing = [f for f in ("config.json", "tokenizer.json") if not (d / f).is_file()]
    if not any(d.glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        raise FileNotFoundError(f"{d} is not an HF-format stage model: missing {', '.join(missing)} "
                                "(save_pretrained writes config.json + safetensors; the tokenizer files "
                                "come from the data stage's tokenizer dir)")
    return d


def log_pyfunc(model_dir: str | Path, name: str, chat: bool, step: int = 0, tags: dict | None = None,
               batch_size: int = 8):
    """Log `model_dir` as an MLflow 3 logged model (pyfunc) under the active run; a ModelInfo.

    MLflow validates the input example by loading the logged model and generating 4 tokens."""
    d = check_hf_dir(model_dir)
    return mlflow.pyfunc.log_model(
        name=name, python_model=str(ENTRY), artifacts={HF_ARTIFACT: str(d)}, signature=signature(chat),
        input_example=(["1+1="], {"max_new_tokens": 4}), model_config={"chat": bool(chat), "batch_size": batch_size},
        pip_requirements=requirements(), step=step, tags=tags, model_type="text-generation")
