"""The config base: one loader for every entry point, one error format, one dotted-key flattener.

Every command and flow (`dsv3 pretrain|extend|data|eval|sft|...`, `python -m flows.*`) builds
its config with `load_config(cls, path, overrides, section=...)`:
    YAML file (a mapping shaped like `RunConfig`: configs/*.yaml, params.yaml)
    -> `--set a.b=c` overrides, in order -> command-line flags (`values`) -> pydantic validation.

Design choices
- `--set` keys are `RunConfig` paths everywhere (`train.steps=3`, `data.dedup.bands=20`,
  `eval.limit=5`). A command that reads one section (`dsv3 data`, `dsv3 eval`, the data and
  evaluate flows) validates only that section and refuses a key outside it, suggesting the
  full path when the key is one of the section's fields (`dedup.bands` -> `data.dedup.bands`).
- An override's value is parsed as YAML (`3`, `true`, `null`, `[mmlu, drop]`); text that is not
  valid YAML (e.g. a path starting with `@`) is kept as the string given.
- Errors are `dsv3.errors.ConfigError`s naming the dotted key; an unknown key gets the closest
  field at that path ("did you mean 'train.steps'?", difflib); a wrong value says what was
  given. Entry points print them with `config_error_exit` (`<prog>: config error: ...`, exit 2).
- `flatten` is the one dotted-key view of a nested config (MLflow params, reports); an empty
  mapping stays a value so no key disappears.
- `write_params` mirrors config sections into params.yaml for DVC: it replaces those
  top-level sections in place and leaves every other line (sections, comments) as it was.
Imports nothing from dsv3 but `dsv3.errors`, so every package may use it.
"""

from __future__ import annotations

import difflib
import sys
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from dsv3.errors import CheckpointError, ConfigError, TrackingError

M = TypeVar("M", bound=BaseModel)


# ---- reading ----------------------------------------------------------------------------------
def read_yaml(path: str | Path) -> dict:
    """The mapping in a YAML config file (an empty file is `{}`); ConfigError naming the file otherwise."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        d = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        ctx, ctx_mark = getattr(e, "context", None), getattr(e, "context_mark", None)
        if ctx and ctx_mark is not None and (mark is None or ctx_mark.line != mark.line):
            problem += f" ({ctx} at line {ctx_mark.line + 1}, column {ctx_mark.column + 1})"
        raise ConfigError(f"{p}: invalid YAML{where}: {problem}") from None
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections, got {type(d).__name__}")
    return d


def set_key(d: dict, key: str, value: Any) -> None:
    """`d[a][b][c] = value` for key `a.b.c`, creating sections on the way."""
    parts = key.split(".")
    if not all(p.strip() for p in parts):
        raise ConfigError(f"override {key!r}: empty component in the key")
    node = d
    for i, p in enumerate(parts[:-1]):
        nxt = node.setdefault(p, {})
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {key!r}: {'.'.join(parts[:i + 1])!r} is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def parse_override(override: str) -> tuple[str, Any]:
    """`"a.b=value"` -> ("a.b", value parsed as YAML, or the raw text when it is not YAML)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key.path=value")
    key, raw = override.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {override!r}: no key before '='")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_override(d: dict, override: str) -> str:
    """Apply `a.b.c=value` to the nested dict `d`; returns the key."""
    key, value = parse_override(override)
    set_key(d, key, value)
    return key


# ---- validation -------------------------------------------------------------------------------
def validate_config(cls: type[M], d: Mapping, prefix: str = "", what: str = "config") -> M:
    """`cls(**d)` with pydantic errors turned into one ConfigError naming each dotted key."""
    try:
        return cls(**d)
    except ValidationError as e:
        raise ConfigError(format_errors(e, cls, prefix, what)) from None


def format_errors(e: ValidationError, root: type[BaseModel], prefix: str = "", what: str = "config") -> str:
    """`invalid config: train.stepz: unknown key (did you mean 'train.steps'?); ...`"""
    parts = []
    for err in e.errors():
        loc = [str(x) for x in err["loc"]]
        key = prefix + ".".join(loc) if loc else (prefix.rstrip(".") or what)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
            hint = suggest(root, loc)
            if hint:
                msg += f" (did you mean {prefix + hint!r}?)"
        elif loc and not isinstance(err.get("input"), (dict, list)):
            msg += f" (got {_short(err.get('input'))})"
        parts.append(f"{key}: {msg}")
    return f"invalid {what}: " + "; ".join(parts)


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _fields(model: Any) -> dict:
    return getattr(model, "model_fields", {}) if isinstance(model, type) else {}


def _submodel(model: Any, name: str) -> Any:
    """The pydantic model type of field `name` of `model` (looking through `X | None`), else None."""
    f = _fields(model).get(name)
    if f is None:
        return None
    args = getattr(f.annotation, "__args__", None) or (f.annotation,)
    return next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)


def suggest(root: type[BaseModel], loc: list[str]) -> str | None:
    """The closest existing dotted key to `loc` (same parents, nearest last name), or None."""
    model: Any = root
    for p in loc[:-1]:
        model = _submodel(model, p)
        if model is None:
            return None
    close = difflib.get_close_matches(loc[-1], list(_fields(model)), n=1)
    return ".".join(loc[:-1] + close) if close else None


# ---- the loader -------------------------------------------------------------------------------
def load_config(cls: type[M], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                section: str | None = None, values: Mapping[str, Any] | None = None,
                root: type[BaseModel] | None = None) -> M:
    """The one loader: YAML file -> `--set` overrides -> `values` (dotted key -> value, None skipped)
    -> `cls`. With `section`, the file is a whole RunConfig mapping and `cls` validates only
    `file[section]`; every key (overrides and values) must then start with `section.`. With
    `root` too (the RunConfig class), the whole file is validated as well, so a typo in another
    section of the same file is an error rather than silently ignored."""
    d = read_yaml(path) if path is not None else {}
    for ov in overrides:
        key = apply_override(d, ov)
        if section is not None:
            _check_in_section(cls, section, key, f"--set {ov}")
    for key, v in (values or {}).items():
        if v is not None:
            set_key(d, key, v)
            if section is not None:
                _check_in_section(cls, section, key, key)
    if section is None:
        return validate_config(cls, d)
    body = d.get(section)
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise ConfigError(f"{section}: must be a mapping of {cls.__name__} fields, got {type(body).__name__}")
    out = validate_config(cls, body, prefix=f"{section}.")
    if root is not None:
        validate_config(root, d)
    return out


def _check_in_section(cls: type[BaseModel], section: str, key: str, what: str) -> None:
    if key.split(".")[0] == section:
        return
    hint = suggest(cls, key.split("."))
    msg = f"{what}: this command reads only the {section!r} section, so keys start with '{section}.'"
    raise ConfigError(msg + (f" (did you mean '{section}.{hint}'?)" if hint else ""))


def config_error_exit(e: ConfigError, prog: str = "dsv3") -> int:
    """What every entry point does with a ConfigError: one line on stderr, exit status 2."""
    print(f"{prog}: config error: {e}", file=sys.stderr)
    return 2


def run_command(parser: Any, argv: list[str] | None, prog: str = "dsv3") -> int:
    """Parse `argv` and run the chosen sub-command's `func`; help and 2 when none was chosen,
    `config_error_exit` on a ConfigError, one line and 1 on a CheckpointError (unreadable, or a
    failed write such as a full disk: its message names the checkpoint and the cause) or a
    TrackingError (the MLflow server named in the message cannot be reached)."""
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        return config_error_exit(e, prog)
    except CheckpointError as e:
        print(f"{prog}: checkpoint error: {e}", file=sys.stderr)
        return 1
    except TrackingError as e:
        print(f"{prog}: tracking error: {e}", file=sys.stderr)
        return 1


# ---- views ------------------------------------------------------------------------------------
def flatten(obj: Mapping | BaseModel, prefix: str = "") -> dict[str, Any]:
    """Dotted-key view of a nested mapping or pydantic model: {"train.steps": 3, ...}."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    out: dict[str, Any] = {}
    for k, v in obj.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, BaseModel):
            v = v.model_dump(mode="json")
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def write_params(path: str | Path, sections: Mapping[str, Any]) -> None:
    """Mirror config sections (pydantic models or plain values) into params.yaml for DVC.
    Each given top-level section is replaced in place (appended when new); every other line --
    other sections, comments -- stays as it was."""
    p = Path(path)
    lines = p.read_text().splitlines(keepends=True) if p.is_file() else []
    if lines:
        read_yaml(p)  # never edit a file that is not a config mapping
        if not lines[-1].endswith("\n"):
            lines[-1] += "\n"
    want = {}
    for name, value in sections.items():
        want[name] = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
        block = [yaml.safe_dump({name: want[name]}, sort_keys=False)]
        start = next((i for i, line in enumerate(lines) if line.split(":", 1)[0] == name and ":" in line), None)
        if start is None:
            lines += block
        else:
            end = start + 1
            while end < len(lines) and _in_body(lines, end):
                end += 1
            lines[start:end] = block
    text = "".join(lines)
    back = yaml.safe_load(text) or {}
    bad = [n for n in want if back.get(n) != want[n]]
    if bad:
        raise ConfigError(f"{p}: could not rewrite section(s) {bad} in place; the file was left unchanged")
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(p)


def _in_body(lines: list[str], i: int) -> bool:
    """Line i continues the section above: indented or a top-level list item, or blank lines
    followed by such a line."""
    j = i
    while j < len(lines) and not lines[j].strip():
        j += 1
    return j < len(lines) and lines[j][0] in " \t-"
