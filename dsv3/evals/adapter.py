"""lm-eval model adapter `dsv3` (DeepSeek-V3 §4.4 / §5.3 benchmarks through the standard harness).

`lm_eval.simple_evaluate(model="dsv3", model_args={"pretrained": PATH_OR_URI, "batch_size": 16})`
loads a HF-format checkpoint directory, or a `runs:/` / `models:/` MLflow URI resolved with
`dsv3.tracking.resolve_model_uri`; the tokenizer comes from the same directory.

Design choices
- Tokenization mirrors lm-eval's `hf` backend exactly (TemplateLM `_encode_pair`, the same
  `tok_encode` BOS logic, the same rolling windows), so per-request log-likelihoods agree
  with `hf` on the same checkpoint to float precision (tests/evals/test_crosscheck.py).
- Scoring (`_loglikelihood_tokens`): requests are de-duplicated by their input tokens (the
  4 MMLU answer letters share one forward). Inputs sharing a long prefix (MMLU: description +
  the same 5 `first_n` dev shots for a whole subject, ~80% of the tokens) run that prefix once
  through `forward_step` into the MLA latent cache, which is copied to every row of a batch of
  suffixes (§2.1.1: the cache is only r + rope floats per token). Other inputs are sorted by length (longest first: an OOM shows
  up at once, and padding is minimal), right-padded and run through the trunk with the
  plain causal mask (right padding never leaks into real positions). Only the positions
  that score continuation tokens go through `norm` + `lm_head` + log-softmax: with a large
  vocabulary that is most of the work `hf` does for every position.
- Generation (`generate_until`): left-padded batches, prefill + greedy/sampled decoding on
  the MLA latent cache (`model.new_cache` / `model.forward_step`), stop strings checked on
  the decoded continuation every few steps so a batch ends as soon as every row stopped;
  the text is cut at the first stop string (as `hf` does). The EOS string is a stop string.
- Precision (§3.3): `precision` ("fp32" | "bf16" | "fp8", model_args; a `dsv3.train.precision.Precision`)
  converts the loaded model (fp8: FP8 Linears) and autocasts every forward, as in training; `dtype`
  is the dtype the weights are loaded in. Without `precision` nothing is converted or autocast.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from dsv3.train.precision import Precision

log = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": None}


def load_checkpoint(pretrained: str, dtype: str | torch.dtype | None = "float32", device: str = "cpu",
                    precision: Precision | str | None = None):
    """(model, tokenizer, local_dir) for a checkpoint directory or MLflow URI; `precision` converts the model."""
    from dsv3 import DeepSeekV3

    local = str(pretrained)
    if "://" in local or local.startswith(("runs:/", "models:/")):
        from dsv3.tracking import resolve_model_uri

        local = resolve_model_uri(local)
    if not Path(local, "config.json").is_file():
        raise FileNotFoundError(f"{pretrained}: no config.json (not a HF-format checkpoint directory)")
    dt = _DTYPES[dtype] if isinstance(dtype, str) else dtype
    model = DeepSeekV3.from_pretrained(local, dtype=dt, device=device).eval()
    Precision.of(precision).prepare(model)
    tok = _checkpoint_tokenizer(local)
    from dsv3.data.tokenizer import check_vocab

    check_vocab(tok, model.config, tokenizer_name=local, model_name=str(pretrained))
    return model, tok, local


def _checkpoint_tokenizer(path: str):
    try:
        from dsv3.data.tokenizer import load_tokenizer as _load
    except ImportError:  # pragma: no cover - data package not installed
        _load = None
    if Path(path, "tokenizer_config.json").is_file() or _load is None:
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast.from_pretrained(path)
    else:
        tok = _load(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


@register_model("dsv3")
class DSV3LM(TemplateLM):
    def __init__(self, pretrained: str, batch_size: int | str = 16, max_batch_size: int | None = None,
                 device: str | None = "cpu", dtype: str = "float32", max_length: int | None = None,
                 max_gen_toks: int = 256, add_bos_token: bool | None = None, stop_check_every: int = 4,
                 min_prefix: int = 32, precision: Precision | str | None = None, **kwargs):
        super().__init__()
        if kwargs:
            log.info("dsv3 adapter: ignoring model_args %s", sorted(kwargs))
        self._device = torch.device(device or "cpu")
        self.precision = Precision.of(precision)
        self.model, self.tokenizer, self.checkpoint_dir = load_checkpoint(pretrained, dtype, str(self._device),
                                                                          self.precision)
        self.pretrained = str(pretrained)
        bs = str(batch_size)
        self.batch_size = int(bs.split(":")[0]) if bs.split(":")[0].isdigit() else int(max_batch_size or 16)
        self._max_length = int(max_length or self.model.config.max_position_embeddings)
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token
        self.stop_check_every = max(1, int(stop_check_every))
        self.min_prefix = int(min_prefix)  # 0 disables prefix sharing

    # ---- lm-eval plumbing -------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        t = self.tokenizer
        return t.bos_token_id if t.bos_token_id is not None else t.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return self.checkpoint_dir.replace("/", "__")

    def get_model_info(self) -> dict:
        return {"model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": str(self.model.dtype), "checkpoint": self.pretrained}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None,
                   **kwargs) -> list[int]:
        kw = ({"add_special_tokens": add_special_tokens} if add_special_tokens is not None else
              {"add_special_tokens": self.add_bos_token} if self.add_bos_token is not None else {})
        bos = self.tokenizer.decode(self.prefix_token_id)
        if add_special_tokens is None and bos and string.startswith(bos):
            kw["add_special_tokens"] = False
        enc = self.tokenizer.encode(string, **kw)
        return enc[-left_truncate_len:] if left_truncate_len else enc

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ---- scoring --------------------------------------------------------------------------------
    def _score(self, inps: list[list[int]], n_last: list[int]) -> list[torch.Tensor]:
        with self.precision.autocast(self._device):
            return self._score_groups(inps, n_last)

    def _score_groups(self, inps: list[list[int]], n_last: list[int]) -> list[torch.Tensor]:
        """For each input, log-softmax [n_last, V] at its last n_last positions. Inputs that
        share a prefix of >= `min_prefix` tokens (MMLU's description + 5 first_n shots) run the
        prefix once into the latent cache and only their suffixes per row."""
        out: list[torch.Tensor | None] = [None] * len(inps)
        singles = []
        for group, P in _prefix_groups(inps, n_last, self.min_prefix):
            if len(group) == 1 or P <= 0:
                singles += group
            else:
                for s in range(0, len(group), self.batch_size):
                    chunk = group[s:s + self.batch_size]
                    for i, lp in zip(chunk, self._score_prefixed([inps[i] for i in chunk], P,
                                                                 [n_last[i] for i in chunk])):
                        out[i] = lp
        for i, lp in zip(singles, self._score_plain([inps[i] for i in singles], [n_last[i] for i in singles])):
            out[i] = lp
        return out

    @torch.no_grad()
    def _score_prefixed(self, inps: list[list[int]], P: int, n_last: list[int]) -> list[torch.Tensor]:
        m, B = self.model, len(inps)
        S = max(len(x) for x in inps) - P
        pad = self.tokenizer.pad_token_id or 0
        one = m.new_cache(1, P)
        m.forward_step(torch.tensor([inps[0][:P]], device=self.device), one)
        cache = m.new_cache(B, P + S)
        for src, dst in zip(one.layers, cache.layers):
            dst.latent[:, :P] = src.latent[:, :P]
            dst.pe[:, :P] = src.pe[:, :P]
        cache.valid[:, :P] = True
        cache.length = P
        ids = torch.full((B, S), pad, dtype=torch.long)
        am = torch.zeros((B, S), dtype=torch.long)
        for r, x in enumerate(inps):
            ids[r, :len(x) - P] = torch.tensor(x[P:])
            am[r, :len(x) - P] = 1
        logits = m.forward_step(ids.to(self.device), cache, am.to(self.device))
        return [F.log_softmax(logits[r, len(x) - P - k:len(x) - P].float(), -1).cpu()
                for r, (x, k) in enumerate(zip(inps, n_last))]

    @torch.no_grad()
    def _score_plain(self, inps: list[list[int]], n_last: list[int]) -> list[torch.Tensor]:
        m, out = self.model, [None] * len(inps)
        order = sorted(range(len(inps)), key=lambda i: -len(inps[i]))
        pad = self.tokenizer.pad_token_id or 0
        for s in range(0, len(order), self.batch_size):
            idx = order[s:s + self.batch_size]
            S = len(inps[idx[0]])
            ids = torch.full((len(idx), S), pad, dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, :len(inps[i])] = torch.tensor(inps[i])
            ids = ids.to(self.device)
            rope = m.rope_for(torch.arange(S, device=self.device))
            h = m.embed_tokens(ids)
            for layer in m.layers:
                h = layer(h, rope)
            rows = torch.cat([torch.full((n_last[i],), r) for r, i in enumerate(idx)])
            cols = torch.cat([torch.arange(len(inps[i]) - n_last[i], len(inps[i])) for i in idx])
            lp = F.log_softmax(m.lm_head(m.norm(h[rows.to(self.device), cols.to(self.device)])).float(), -1).cpu()
            for i, part in zip(idx, lp.split([n_last[i] for i in idx])):
                out[i] = part
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        groups: dict[tuple, list[int]] = defaultdict(list)
        conts = []
        for k, (_, ctx, cont) in enumerate(requests):
            whole = (list(ctx) + list(cont))[-(self.max_length + 1):]
            inp = tuple(whole[:-1])
            groups[inp].append(k)
            conts.append(list(cont))
        keys = list(groups)
        need = [max(len(conts[k]) for k in groups[key]) for key in keys]
        scored = self._score([list(k) for k in keys], need)
        res: list[tuple[float, bool] | None] = [None] * len(requests)
        for key, lp in zip(keys, scored):
            for k in groups[key]:
                cont = torch.tensor(conts[k], dtype=torch.long)
                part = lp[lp.shape[0] - len(cont):]
                ll = float(part.gather(-1, cont[:, None]).sum())
                greedy = bool((part.argmax(-1) == cont).all())
                res[k] = (ll, greedy)
                if requests[k][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[k][0], res[k])
        return res

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for r, (string,) in enumerate(req.args for req in requests):
            for w in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None,) + w)
                owner.append(r)
        scores = self._loglikelihood_tokens(windows)
        total = [0.0] * len(requests)
        for r, (ll, _) in zip(owner, scores):
            total[r] += ll
        for req, t in zip(requests, total):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, t)
        return total

    # ---- generation ------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        by_kwargs: dict[str, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            by_kwargs[repr(sorted(req.args[1].items()))].append(i)
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        for idxs in by_kwargs.values():
            kwargs = normalize_gen_kwargs(dict(requests[idxs[0]].args[1]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = int(kwargs.pop("max_gen_toks"))
            temperature = float(kwargs.get("temperature", 0.0) or 0.0) if kwargs.get("do_sample") else 0.0
            if max_gen >= self.max_length:  # e.g. humaneval's 1024 on a 512-position model
                log.warning("max_gen_toks %d >= max_length %d: clamped to %d", max_gen, self.max_length,
                            self.max_length // 2)
                max_gen = self.max_length // 2
            max_ctx = self.max_length - max_gen
            encs = {i: self.tok_encode(requests[i].args[0], left_truncate_len=max_ctx) for i in idxs}
            order = sorted(idxs, key=lambda i: -len(encs[i]))
            for s in range(0, len(order), self.batch_size):
                batch = order[s:s + self.batch_size]
                with self.precision.autocast(self._device):
                    texts = self._generate([encs[i] for i in batch], max_gen, until, temperature)
                for i, t in zip(batch, texts):
                    out[i] = t
                    self.cache_hook.add_partial("generate_until", requests[i].args, t)
        return out

    @torch.no_grad()
    def _generate(self, prompts: list[list[int]], max_new: int, until: list[str], temperature: float) -> list[str]:
        from dsv3.model.transformer import sample

        m, B = self.model, len(prompts)
        S = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((B, S), pad, dtype=torch.long)
        am = torch.zeros((B, S), dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, S - len(p):] = torch.tensor(p)
            am[r, S - len(p):] = 1
        ids, am = ids.to(self.device), am.to(self.device)
        cache = m.new_cache(B, S + max_new)
        logits = m.forward_step(ids, cache, am)[:, -1]
        new: list[list[int]] = [[] for _ in range(B)]
        done = [False] * B
        eos = self.eot_token_id
        for step in range(max_new):
            nxt = sample(logits.float(), temperature)
            for r in range(B):
                if not done[r]:
                    new[r].append(int(nxt[r]))
                    done[r] = int(nxt[r]) == eos
            if (step + 1) % self.stop_check_every == 0 or step == max_new - 1:
                for r in range(B):
                    if not done[r] and any(u and u in self.tok_decode(new[r]) for u in until):
                        done[r] = True
            if all(done) or step == max_new - 1:
                break
            logits = m.forward_step(nxt[:, None].to(self.device), cache)[:, -1]
        return [postprocess_generated_text(self.tok_decode(t), until, None) for t in new]


def _lcp(a, b) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _prefix_groups(inps, n_last, min_prefix: int):
    """Group inputs (sorted lexicographically) whose common prefix, short of every member's
    scored tail, is >= min_prefix tokens; a new group starts where joining would at least halve
    the prefix (a new MMLU subject). Yields (indices, prefix_len), prefix_len 0 = none."""
    if not inps:
        return
    if min_prefix <= 0:
        yield list(range(len(inps))), 0
        return
    order = sorted(range(len(inps)), key=lambda i: inps[i])
    cur, P = [order[0]], len(inps[order[0]]) - n_last[order[0]]
    for i in order[1:]:
        newP = min(P, _lcp(inps[cur[-1]], inps[i]), len(inps[i]) - n_last[i])
        if newP >= min_prefix and 2 * newP >= P:  # joining must not halve the shared prefix
            cur.append(i)
            P = newP
        else:
            yield cur, (P if len(cur) > 1 else 0)
            cur, P = [i], len(inps[i]) - n_last[i]
    yield cur, (P if len(cur) > 1 else 0)
