"""Hugging Face DeepseekV3 checkpoint interop: the state-dict adapter.

Design choices
- Our module tree uses HF parameter names, so the adapter only renames prefixes:
  `model.` for the trunk, and the official layout for MTP, which the release stores as
  an extra decoder layer at index `num_hidden_layers + k` holding `enorm`, `hnorm`,
  `eh_proj`, `shared_head.norm`, plus copies of `embed_tokens` and `shared_head.head`.
  We read those copies for validation only (the MTP module shares the main tensors)
  and write them on save so the directory matches the official format.
- Both expert layouts load: per-expert (`mlp.experts.{e}.gate_proj.weight`, the release
  and transformers' save format) and fused 3-D (`mlp.experts.gate_up_proj`/`down_proj`).
- DeepSeek's FP8 release stores `weight` as float8_e4m3fn with `weight_scale_inv` per
  128x128 block; those are dequantized on load (w · scale per block).
- Only safetensors are read: nothing is unpickled. Every mismatch is an error naming the
  tensor: missing, unexpected, or wrong shape.
- A checkpoint with no MTP tensors at all (e.g. saved by transformers, which has no MTP
  module) loads with the MTP modules dropped, with a warning.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsv3.errors import CheckpointError
from dsv3.model.config import ModelConfig


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _mtp_hf_name(ours: str, n_layers: int) -> str:
    m = re.match(r"mtp\.(\d+)\.(.*)", ours)
    k, rest = int(m.group(1)), m.group(2)
    idx = n_layers + k
    if rest.startswith("block."):
        rest = rest[len("block."):]
    elif rest.startswith("norm."):
        rest = "shared_head." + rest
    return f"model.layers.{idx}.{rest}"


def to_hf_name(ours: str, n_layers: int) -> str:
    if ours == "lm_head.weight":
        return ours
    if ours.startswith("mtp."):
        return _mtp_hf_name(ours, n_layers)
    return "model." + ours


def from_hf_name(hf: str, n_layers: int) -> str | None:
    """Our name for a HF tensor name; None for the MTP copies of embedding / head."""
    if hf == "lm_head.weight":
        return hf
    if not hf.startswith("model."):
        return "?" + hf
    name = hf[len("model."):]
    m = re.match(r"layers\.(\d+)\.(.*)", name)
    if m and int(m.group(1)) >= n_layers:
        k, rest = int(m.group(1)) - n_layers, m.group(2)
        if rest in ("embed_tokens.weight", "shared_head.head.weight"):
            return None
        if rest.startswith("shared_head.norm."):
            return f"mtp.{k}.norm." + rest[len("shared_head.norm."):]
        if rest.split(".")[0] in ("enorm", "hnorm", "eh_proj"):
            return f"mtp.{k}.{rest}"
        return f"mtp.{k}.block.{rest}"
    return name


def _shard_files(path: Path) -> list[Path]:
    idx = path / "model.safetensors.index.json"
    if idx.is_file():
        try:
            wm = json.loads(idx.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{idx}: corrupt index ({e})") from None
        files = sorted({path / f for f in wm.values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        if list(path.glob("*.bin")) or list(path.glob("*.pt")):
            raise CheckpointError(f"{path}: only pickle weights found; dsv3 reads safetensors only")
        raise CheckpointError(f"{path}: no safetensors weights")
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f}: shard listed in the index is missing")
    return files


def _dequant_fp8(w: torch.Tensor, scale_inv: torch.Tensor, block: int = 128) -> torch.Tensor:
    """w_fp8 [out,in] with scale_inv [ceil(out/128), ceil(in/128)] -> float32."""
    out_f, in_f = w.shape
    s = scale_inv.float().repeat_interleave(block, 0)[:out_f].repeat_interleave(block, 1)[:, :in_f]
    return w.float() * s


def read_hf_tensors(path: Path) -> dict[str, torch.Tensor]:
    raw: dict[str, torch.Tensor] = {}
    for f in _shard_files(path):
        try:
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    raw[k] = sf.get_tensor(k)
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{f}: unreadable safetensors file ({e})") from None
    out = {}
    for k, t in raw.items():
        if k.endswith(".weight_scale_inv"):
            continue
        sk = k[: -len(".weight")] + ".weight_scale_inv" if k.endswith(".weight") else None
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            if sk not in raw:
                raise CheckpointError(f"{k}: FP8 tensor without {sk}")
            t = _dequant_fp8(t, raw[sk])
        out[k] = t
    return out


def _unfuse_experts(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' fused 3-D expert tensors -> per-expert 2-D tensors."""
    out = {}
    for k, v in t.items():
        m = re.match(r"(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$", k)
        if not m:
            out[k] = v
            continue
        if m.group(2) == "gate_up_proj":
            g, u = v.chunk(2, dim=1)
            for e in range(v.shape[0]):
                out[f"{m.group(1)}.{e}.gate_proj.weight"] = g[e]
                out[f"{m.group(1)}.{e}.up_proj.weight"] = u[e]
        else:
            for e in range(v.shape[0]):
                out[f"{m.group(1)}.{e}.down_proj.weight"] = v[e]
    return out


def load_pretrained(cls, path, dtype: torch.dtype | None = None, device=None):
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    cfg = ModelConfig.from_hf(path)
    hf_cfg = json.loads((path / "config.json").read_text())
    tensors = _unfuse_experts(read_hf_tensors(path))
    L = cfg.num_hidden_layers
    has_fp8 = "quantization_config" in hf_cfg
    if dtype is None:
        dtype = torch.bfloat16 if has_fp8 else _DTYPES.get(hf_cfg.get("torch_dtype") or hf_cfg.get("dtype"),
                                                           torch.float32)
    sd: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for k, v in tensors.items():
        ours = from_hf_name(k, L)
        if ours is None:
            continue
        if ours.startswith("?"):
            unexpected.append(k)
        else:
            sd[ours] = v
    if cfg.num_nextn_predict_layers and not any(k.startswith("mtp.") for k in sd):
        warnings.warn(f"{path}: no MTP weights; loading without the {cfg.num_nextn_predict_layers} MTP module(s)")
        cfg = cfg.replace(num_nextn_predict_layers=0)
    with torch.device("meta"):
        model = cls(cfg)
    expected = model.state_dict()
    unexpected += [to_hf_name(k, L) for k in sd if k not in expected]
    missing = [to_hf_name(k, L) for k in expected if k not in sd]
    if cfg.tie_word_embeddings:
        missing = [m for m in missing if m != "lm_head.weight"]
    if missing or unexpected:
        msg = []
        if missing:
            msg.append(f"missing tensors: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
        if unexpected:
            msg.append(f"unexpected tensors: {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
        raise CheckpointError(f"{path}: " + "; ".join(msg))
    for k, ref in expected.items():
        if k in sd and tuple(sd[k].shape) != tuple(ref.shape):
            raise CheckpointError(f"{path}: tensor {to_hf_name(k, L)} has shape {tuple(sd[k].shape)}, "
                                  f"config expects {tuple(ref.shape)}")
    model.to_empty(device=device or "cpu")
    model.to(dtype)
    with torch.no_grad():
        for k, p in model.state_dict().items():
            if k in sd:
                p.copy_(sd[k])
    model.rotary.__init__(cfg)
    model.rotary.to(device or "cpu")
    for m in model.moe_layers():
        m.gate.load.zero_()
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model


def save_pretrained(model, path, max_shard_bytes: int = 4 << 30) -> None:
    """Write config.json and safetensors (sharded with an index past max_shard_bytes)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg: ModelConfig = model.config
    L = cfg.num_hidden_layers
    sd = {to_hf_name(k, L): v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    for k in range(len(model.mtp)):  # official layout keeps copies of the shared tensors
        sd[f"model.layers.{L + k}.embed_tokens.weight"] = model.embed_tokens.weight.detach().cpu().clone()
        sd[f"model.layers.{L + k}.shared_head.head.weight"] = model.lm_head.weight.detach().cpu().clone()
    hf = cfg.to_hf()
    hf["num_nextn_predict_layers"] = len(model.mtp)
    hf["torch_dtype"] = str(model.dtype).replace("torch.", "")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(sd):
        nbytes = sd[k].numel() * sd[k].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = sd[k]
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"), metadata=meta)
    else:
        n = len(shards)
        wm = {}
        for i, s in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            save_file(s, str(path / name), metadata=meta)
            wm.update({k: name for k in s})
        total = sum(v.numel() * v.element_size() for v in sd.values())
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": wm}, indent=1))
    (path / "config.json").write_text(json.dumps(hf, indent=1))
