"""`dsv3 model info`: parameter counts and FLOPs of a preset or a checkpoint's config."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("model", help="inspect model configs")
    s = p.add_subparsers(dest="model_cmd", metavar="CMD")
    info = s.add_parser("info", help="parameter counts (from shapes alone) and FLOPs/token")
    g = info.add_mutually_exclusive_group()
    g.add_argument("--preset", default="small")
    g.add_argument("--hf", help="a HF checkpoint dir or config.json")
    info.add_argument("--seq-len", type=int, default=4096)
    info.set_defaults(func=_info)


def _info(args) -> int:
    from dsv3.model.config import ModelConfig

    cfg = ModelConfig.from_hf(args.hf) if args.hf else ModelConfig.preset(args.preset)
    rows = [
        ("total parameters", cfg.num_params()),
        ("activated parameters / token", cfg.num_params(activated=True)),
        ("total incl. MTP", cfg.num_params(include_mtp=True)),
        (f"training FLOPs / token @ {args.seq_len}", cfg.flops_per_token(args.seq_len)),
    ]
    for name, v in rows:
        print(f"{name:<36} {v / 1e9:12.3f} B" if v >= 1e8 else f"{name:<36} {v / 1e6:12.3f} M")
    return 0
