"""Normalize stage: Unicode NFC, control characters, whitespace (DeepSeek-V3 §4.1 data pipeline).

Design: a pure per-document function (safe to run on Ray) that never drops a document
except when nothing is left (`filtered:empty`). Code keeps its indentation: only line
endings, trailing spaces and blank-line runs are touched. Literal special-token strings
(`<｜fim▁hole｜>`, ...) are removed so that FIM and BOS/EOS framing stay unambiguous.
Statistics: documents changed, control characters and special tokens removed.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

from dsv3.data.config import DataConfig

SPECIAL_TOKENS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜fim▁hole｜>", "<｜fim▁begin｜>",
                  "<｜fim▁end｜>", "<｜User｜>", "<｜Assistant｜>", "<｜pad｜>"]
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\ufeff]")
_SPACES = re.compile(r"(?<=\S)[ \t\u00a0\u3000]{2,}")
_TRAIL = re.compile(r"[ \t]+$", re.M)
_SPECIAL = re.compile("|".join(map(re.escape, SPECIAL_TOKENS)))


def normalize(doc: dict, cfg: DataConfig, stats: Counter) -> dict | None:
    c = cfg.normalize
    text = doc["text"]
    orig = text
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = unicodedata.normalize(c.unicode_form, text)
    if c.strip_control:
        text, n = _CONTROL.subn("", text)
        stats["control_chars_removed"] += n
    text, n = _SPECIAL.subn("", text)
    stats["special_tokens_removed"] += n
    text = _TRAIL.sub("", text)
    if c.collapse_spaces and doc.get("kind") != "code":
        text = _SPACES.sub(" ", text)
    text = re.sub(r"\n{%d,}" % (c.max_blank_lines + 2), "\n" * (c.max_blank_lines + 1), text)
    text = text.strip("\n").rstrip()
    stats["docs"] += 1
    if text != orig:
        stats["changed"] += 1
    if not text.strip():
        doc["drop"] = "filtered:empty"
        return None
    doc["text"] = text
    return doc
