"""OpenAI API request models and response shapes (the subset vLLM / SGLang users rely on).

Design choices
- Requests are pydantic models; unknown fields are ignored (clients send vendor extras), but a
  field we do not implement with a non-default value (`logit_bias`, `suffix`, penalties,
  `best_of` > 1) is a 400 naming it, rather than a silently different answer.
- Defaults are OpenAI's: `max_tokens` 16 for completions (the rest of the context for chat),
  `temperature` 1, `top_p` 1, `n` 1. vLLM's extensions `ignore_eos` and `stop_token_ids` are
  accepted.
- Completions `logprobs` are the legacy shape ({tokens, token_logprobs, top_logprobs,
  text_offset}); with `echo` the prompt's tokens come first, the first one with a None logprob:
  what lm-eval's `local-completions` reads to score log-likelihoods. Chat uses
  `logprobs: true` + `top_logprobs: N` and the `content` list shape.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dsv3.serve.sampling import SamplingParams


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: dict | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    user: str | None = None

    def unsupported(self) -> str | None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                return name
        return "logit_bias" if self.logit_bias else None

    def sampling(self, max_tokens: int, logprobs: int | None, echo: bool = False) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                              seed=self.seed, stop=stop, stop_token_ids=list(self.stop_token_ids or []),
                              ignore_eos=self.ignore_eos, logprobs=logprobs, echo=echo)

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _nonempty(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be an empty list")
        return v

    def unsupported(self) -> str | None:
        if self.suffix:
            return "suffix"
        if self.best_of not in (None, 1):
            return "best_of"
        return super().unsupported()

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise ValueError(f"message content part of type {part.get('type')!r} is not supported (text only)")
            parts.append(part.get("text", ""))
        return "".join(parts)


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def dicts(self) -> list[dict]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_logprobs(tok_str, lps, offset0: int = 0) -> dict:
    """Legacy logprobs of TokenLogprob items: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, values, tops, offsets = [], [], [], []
    off = offset0
    for lp in lps:
        s = tok_str(lp.token)
        tokens.append(s)
        values.append(lp.logprob)
        tops.append(None if lp.logprob is None else {tok_str(t): v for t, v in lp.top})
        offsets.append(off)
        off += len(s)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(tok_str, lps) -> dict:
    def entry(t, v):
        s = tok_str(t)
        return {"token": s, "logprob": v, "bytes": list(s.encode("utf-8"))}

    return {"content": [{**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in lps]}
