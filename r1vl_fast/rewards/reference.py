"""Slow, obviously-correct twins of the C++ key-step matcher, used by the tests (never by training).

Each function states the rule in plain Python: ``re`` for step extraction, ``str.lower`` for case, ``in``
for substring search, and a direct window-by-window LCS for RapidFuzz's ``partial_ratio``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from r1vl_fast.rewards.format import STEP_SECTION

OPERATORS = frozenset("+-*/=^<>()[]{},;:|")
_UNIFY = {
    **dict.fromkeys("\u2212\u2010\u2011\u2012\u2013\u2014\u2015\ufe63\uff0d", "-"),
    **dict.fromkeys("\u00d7\u00b7\u22c5\u2217", "*"),
    **dict.fromkeys("\u00f7\u2215\u2044", "/"),
    "\uff1d": "=",
    "\uff0b": "+",
}
_COMMANDS = {
    "left": "", "right": "",
    "times": "*", "cdot": "*", "ast": "*",
    "div": "/",
    "frac": "frac", "dfrac": "frac", "tfrac": "frac",
    "circ": "\u00b0", "degree": "\u00b0",
}
_MAX_FRAC_DEPTH = 32


def extract_steps(text: str) -> str:
    """The released code's step text: every ``### Step N:`` section, joined by one space."""
    return " ".join(STEP_SECTION.findall(text))


def _is_ascii_letter(c: str) -> bool:
    return ("a" <= c <= "z") or ("A" <= c <= "Z")


def _rewrite_tokens(s: str) -> str:
    out: list[str] = []
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if c == "$":
            i += 1
            continue
        if c == "\\" and i + 1 < n:
            nxt = s[i + 1]
            if _is_ascii_letter(nxt):
                j = i + 1
                while j < n and _is_ascii_letter(s[j]):
                    j += 1
                name = s[i + 1 : j]
                out.append(_COMMANDS.get(name, s[i:j]))
                i = j
                continue
            if nxt in ",!;: ":
                i += 2
                continue
            if nxt == "%":
                out.append("%")
                i += 2
                continue
        out.append(_UNIFY.get(c, c))
        i += 1
    return "".join(out)


def _fraction_digits(digits: str) -> str:
    digits = digits.rstrip("0")
    return "." + digits if digits else ""


def _canonical_numbers(s: str) -> str:
    out: list[str] = []
    i, n = 0, len(s)

    def digit_run_end(k: int) -> int:
        while k < n and "0" <= s[k] <= "9":
            k += 1
        return k

    while i < n:
        c = s[i]
        if "0" <= c <= "9":
            j = digit_run_end(i)
            out.append(s[i:j])
            if j - i <= 3:  # thousands separators: 1,234,567 (groups of exactly three digits)
                while (
                    j + 4 <= n
                    and s[j] == ","
                    and all("0" <= d <= "9" for d in s[j + 1 : j + 4])
                    and (j + 4 == n or not ("0" <= s[j + 4] <= "9"))
                ):
                    out.append(s[j + 1 : j + 4])
                    j += 4
            if j + 1 < n and s[j] == "." and "0" <= s[j + 1] <= "9":
                f = digit_run_end(j + 1)
                out.append(_fraction_digits(s[j + 1 : f]))
                j = f
            i = j
        elif c == "." and i + 1 < n and "0" <= s[i + 1] <= "9" and (i == 0 or not ("0" <= s[i - 1] <= "9")):
            f = digit_run_end(i + 1)
            out.append("0" + _fraction_digits(s[i + 1 : f]))
            i = f
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _wrap(arg: str) -> str:
    arg = arg.strip()
    atom = bool(arg) and not any(ch in OPERATORS or ch.isspace() for ch in arg)
    return arg if atom else "(" + arg + ")"


def _rewrite_fractions(s: str) -> str:
    close: dict[int, int] = {}
    stack: list[int] = []
    for i, ch in enumerate(s):
        if ch == "{":
            stack.append(i)
        elif ch == "}" and stack:
            close[stack.pop()] = i

    def rewrite(lo: int, hi: int, depth: int) -> str:
        out: list[str] = []
        i = lo
        while i < hi:
            if (
                depth < _MAX_FRAC_DEPTH
                and s.startswith("frac{", i)
                and i + 5 <= hi
                and (i == lo or not ("a" <= s[i - 1] <= "z"))
            ):
                a_close = close.get(i + 4)
                if a_close is not None and a_close + 1 < hi and s[a_close + 1] == "{":
                    b_close = close.get(a_close + 1)
                    if b_close is not None and b_close < hi:
                        a = rewrite(i + 5, a_close, depth + 1)
                        b = rewrite(a_close + 2, b_close, depth + 1)
                        out.append(_wrap(a) + "/" + _wrap(b))
                        i = b_close + 1
                        continue
            out.append(s[i])
            i += 1
        return "".join(out)

    return rewrite(0, len(s), 0)


def _collapse_spaces(s: str) -> str:
    out: list[str] = []
    pending = False
    for c in s:
        if c.isspace():
            pending = True
            continue
        if pending and out and out[-1] not in OPERATORS and c not in OPERATORS:
            out.append(" ")
        pending = False
        out.append(c)
    return "".join(out)


def normalize(s: str) -> str:
    """The paper preset's soft normalisation (docs/REWARDS.md lists the rules in this order)."""
    s = s.lower()
    s = _rewrite_tokens(s)
    s = _canonical_numbers(s)
    s = _rewrite_fractions(s)
    s = _collapse_spaces(s)
    return re.sub("\\^(?:\\{\u00b0\\}|\u00b0)", "\u00b0", s)


def prepare_text(text: str, mode: str, scope: str) -> str:
    body = extract_steps(text) if scope == "steps" else text
    return body.lower() if mode == "r1vl" else normalize(body)


def groups_of(item: Any) -> list[list[str]]:
    steps = item["Steps"] if isinstance(item, dict) else item
    return [[g] if isinstance(g, str) else list(g) for g in steps]


def lcs_length(a: str, b: str) -> int:
    prev = [0] * (len(b) + 1)
    for ca in a:
        cur = [0]
        for j, cb in enumerate(b):
            cur.append(prev[j] + 1 if ca == cb else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def _window_similarity(needle: str, window: str) -> float:
    lensum = len(needle) + len(window)
    dist = lensum - 2 * lcs_length(needle, window)
    return 1.0 - dist / lensum if lensum else 1.0


def _best_window(needle: str, hay: str) -> float:
    m, n = len(needle), len(hay)
    windows = [hay[:i] for i in range(1, m)]
    windows += [hay[i : i + m] for i in range(n - m + 1)]
    windows += [hay[i:] for i in range(n - m + 1, n)]
    return max((_window_similarity(needle, w) for w in windows), default=0.0)


def partial_ratio(a: str, b: str) -> float:
    """RapidFuzz's ``fuzz.partial_ratio(a, b)``: best ratio of the shorter string against every window
    (full length, and shorter ones at both ends) of the longer; both directions when lengths are equal."""
    if not a and not b:
        return 100.0
    if not a or not b:
        return 0.0
    shorter, longer = (a, b) if len(a) <= len(b) else (b, a)
    best = _best_window(shorter, longer)
    if best != 1.0 and len(a) == len(b):
        best = max(best, _best_window(longer, shorter))
    return 100.0 if best == 1.0 else best * 100


def match_groups(
    text: str,
    item: Any,
    *,
    mode: str = "r1vl",
    scope: str = "steps",
    fuzzy_threshold: float = 90.0,
    min_alt_len: int = 0,
) -> list[bool]:
    """Which groups of one sample's key steps are present in one text."""
    body = prepare_text(text, mode, scope)
    found = []
    for group in groups_of(item):
        hit = False
        for alt in group:
            alt = alt.lower() if mode == "r1vl" else normalize(alt)
            if len(alt) < min_alt_len or (mode != "r1vl" and not alt):
                continue
            if alt in body or (mode == "fuzzy" and partial_ratio(alt, body) >= fuzzy_threshold):
                hit = True
                break
        found.append(hit)
    return found


def match_key_steps(texts: Sequence[str], key_steps: Sequence[Any], **kwargs: Any) -> list[float]:
    out = []
    for text, item in zip(texts, key_steps):
        found = match_groups(text, item, **kwargs)
        out.append(sum(found) / len(found) if found else 0.0)
    return out
