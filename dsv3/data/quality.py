"""Quality stage: Gopher-style heuristics for prose, code-aware rules for source files (§4.1).

Prose rules follow Rae et al. 2021 (Gopher) as datatrove implements them: word count,
mean word length, symbol/word ratio, bullet and ellipsis lines, alphabetic-word fraction,
stop words, duplicate line/paragraph fractions (by count and by characters), top n-gram
and duplicated n-gram character fractions. Code (doc["kind"] == "code") skips the
natural-language rules and uses line-shape rules instead (min lines, max / mean line
length, alphanumeric fraction, duplicate non-trivial lines). The first failing rule is
the drop reason (`filtered:<rule>`); kept documents carry `quality_score` = fraction of
rules passed (1.0 for a kept doc unless a rule is disabled) for the GX range check.
"""

from __future__ import annotations

import re
from collections import Counter

from dsv3.data.config import DataConfig

STOP_WORDS = {"the", "be", "to", "of", "and", "that", "have", "with"}
_WORD = re.compile(r"\S+")
_NON_ALNUM = re.compile(r"[\W_]+")  # removing these leaves the alphanumeric characters


def _dup_fracs(items: list[str]) -> tuple[float, float]:
    """(fraction of items that repeat an earlier one, fraction of their characters)."""
    seen, dup, dup_chars, total_chars = set(), 0, 0, 0
    for x in items:
        total_chars += len(x)
        if x in seen:
            dup += 1
            dup_chars += len(x)
        seen.add(x)
    return (dup / len(items) if items else 0.0, dup_chars / total_chars if total_chars else 0.0)


def _top_ngram_frac(words: list[str], n: int) -> float:
    grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    if not grams:
        return 0.0
    g, c = grams.most_common(1)[0]
    return sum(len(w) for w in g) * c / max(1, sum(len(w) for w in words))


def _dup_ngram_frac(words: list[str], n: int) -> float:
    """Characters covered by n-grams that occur more than once (overlaps counted once)."""
    if len(words) < n:
        return 0.0
    counts = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    covered = [False] * len(words)
    for i in range(len(words) - n + 1):
        if counts[tuple(words[i:i + n])] > 1:
            covered[i:i + n] = [True] * n
    return sum(len(w) for w, c in zip(words, covered) if c) / max(1, sum(len(w) for w in words))


def prose_checks(text: str, q) -> list[tuple[str, bool]]:
    words = _WORD.findall(text)
    n = len(words)
    lines = [l for l in text.split("\n") if l.strip()]
    paras = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    checks = [("min_words", n >= q.min_words), ("max_words", n <= q.max_words)]
    if n == 0:
        return checks
    mwl = sum(len(w) for w in words) / n
    checks += [
        ("mean_word_len", q.min_mean_word_len <= mwl <= q.max_mean_word_len),
        ("symbol_word_ratio", (text.count("#") + text.count("...") + text.count("…")) / n <= q.max_symbol_word_ratio),
        ("bullet_lines", sum(l.lstrip().startswith(("•", "-", "*")) for l in lines) / max(1, len(lines))
         <= q.max_bullet_lines),
        ("ellipsis_lines", sum(l.rstrip().endswith(("...", "…")) for l in lines) / max(1, len(lines))
         <= q.max_ellipsis_lines),
        ("alpha_words", sum(any(ch.isalpha() for ch in w) for w in words) / n >= q.min_alpha_words),
        ("stop_words", sum(w.lower() in STOP_WORDS for w in words) >= q.min_stop_words),
    ]
    dl, dlc = _dup_fracs(lines)
    dp, dpc = _dup_fracs(paras)
    checks += [("dup_line_frac", dl <= q.max_dup_line_frac), ("dup_para_frac", dp <= q.max_dup_para_frac),
               ("dup_line_char_frac", dlc <= q.max_dup_line_char_frac),
               ("dup_para_char_frac", dpc <= q.max_dup_para_char_frac)]
    low = [w.lower() for w in words]
    checks += [(f"top_{k}gram", _top_ngram_frac(low, k) <= v) for k, v in sorted(q.max_top_ngram_char_frac.items())]
    checks += [(f"dup_{k}gram", _dup_ngram_frac(low, k) <= v) for k, v in sorted(q.max_dup_ngram_char_frac.items())]
    return checks


def code_checks(text: str, q) -> list[tuple[str, bool]]:
    lines = text.split("\n")
    lens = [len(l) for l in lines]
    nontrivial = [l.strip() for l in lines if len(l.strip()) > 10]
    alnum = len(_NON_ALNUM.sub("", text)) / max(1, len(text))
    return [("code_min_lines", len(lines) >= q.code_min_lines),
            ("code_max_line_len", max(lens) <= q.code_max_line_len),
            ("code_mean_line_len", sum(lens) / len(lines) <= q.code_max_mean_line_len),
            ("code_alnum_frac", alnum >= q.code_min_alnum_frac),
            ("code_dup_lines", _dup_fracs(nontrivial)[0] <= q.code_max_dup_line_frac)]


def quality(doc: dict, cfg: DataConfig, stats: Counter) -> dict | None:
    q = cfg.quality
    stats["docs"] += 1
    if not q.enabled:
        doc["quality_score"] = 1.0
        return doc
    checks = code_checks(doc["text"], q) if doc.get("kind") == "code" else prose_checks(doc["text"], q)
    doc["quality_score"] = round(sum(ok for _, ok in checks) / len(checks), 4)
    failed = next((name for name, ok in checks if not ok), None)
    if failed:
        stats[f"failed:{failed}"] += 1
        doc["drop"] = f"filtered:{failed}"
        return None
    stats["passed"] += 1
    return doc
