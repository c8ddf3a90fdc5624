"""PII scrubbing stage: typed placeholders for personal data and secrets (§4.1 data hygiene).

Kinds, applied in `pii.kinds` order (longest / most specific first so a key block is not
half-eaten by the token rule): private-key blocks -> [PRIVATE_KEY], cloud access keys
(AWS AKIA/ASIA ids) -> [AWS_KEY], tokens (GitHub, Slack, OpenAI-style sk-, Google AIza,
JWT, `aws_secret_access_key = ...`) -> [TOKEN], e-mails -> [EMAIL], credit-card numbers
(13-19 digits passing the Luhn check) -> [CREDIT_CARD], IPv6 / IPv4 (validated by
`ipaddress`; loopback, private and documentation ranges kept when `keep_private_ips`)
-> [IPV6] / [IPV4], phone numbers -> [PHONE]. Documents are never dropped here.
`RESIDUAL_PATTERNS` are what the GX suite asserts no curated text still contains.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter

from dsv3.data.config import DataConfig

PATTERNS = {
    "private_key": re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----[\s\S]*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----"),
    "aws_key": re.compile(r"\b(?:AKIA|ASIA|ABIA|ACCA)[0-9A-Z]{16}\b"),
    "token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b|\bxox[abprs]-[A-Za-z0-9-]{10,}|\bsk-[A-Za-z0-9_-]{20,}"
                        r"|\bAIza[0-9A-Za-z_-]{35}\b|\beyJ[\w-]{5,}\.eyJ[\w-]{5,}\.[\w-]{5,}"
                        r"|(?i:aws_secret_access_key)[\"']?\s*[=:]\s*[\"']?[A-Za-z0-9/+=]{40}"),
    "email": re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"),
    "credit_card": re.compile(r"(?<![\w.])\d(?:[ -]?\d){12,18}(?![\w.])"),
    "ipv6": re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])"),
    "ipv4": re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w.])"),
    "phone": re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)|\d{3})[ .-]\d{3,4}[ .-]\d{4}(?!\w)"),
}
# cheap substring guards: a pattern only runs when one of its literal anchors occurs (speed, same output)
GUARDS = {"private_key": ("PRIVATE KEY",), "aws_key": ("AKIA", "ASIA", "ABIA", "ACCA"), "email": ("@",),
          "token": ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "xox", "sk-", "AIza", "eyJ")}
PLACEHOLDER = {k: f"[{k.upper()}]" for k in PATTERNS}
RESIDUAL_PATTERNS = {k: PATTERNS[k].pattern for k in ("private_key", "aws_key", "email")}


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _accept(kind: str, s: str, keep_private: bool) -> bool:
    if kind == "credit_card":
        digits = re.sub(r"\D", "", s)
        return 13 <= len(digits) <= 19 and luhn_ok(digits) and len(set(digits)) > 1
    if kind in ("ipv4", "ipv6"):
        try:
            ip = ipaddress.ip_address(s)
        except ValueError:
            return False
        return ip.is_global or not keep_private
    return True


def scrub_text(text: str, cfg: DataConfig, stats: Counter | None = None) -> str:
    keep = cfg.pii.keep_private_ips
    for kind in cfg.pii.kinds:
        pat, ph = PATTERNS[kind], PLACEHOLDER[kind]
        if kind in GUARDS and not any(g in text for g in GUARDS[kind]) and not (
                kind == "token" and "aws_secret_access_key" in text.lower()):
            continue

        def sub(m: re.Match) -> str:
            if not _accept(kind, m.group(0), keep):
                return m.group(0)
            if stats is not None:
                stats[kind] += 1
            return ph

        text = pat.sub(sub, text)
    return text


def scrub(doc: dict, cfg: DataConfig, stats: Counter) -> dict:
    stats["docs"] += 1
    if not cfg.pii.enabled:
        return doc
    found = Counter()
    doc["text"] = scrub_text(doc["text"], cfg, found)
    if found:
        stats["docs_with_pii"] += 1
        stats.update(found)
    return doc
