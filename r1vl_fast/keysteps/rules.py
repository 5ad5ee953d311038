"""The offline key-step extractor: numbers, equations and short key phrases taken verbatim from a reference CoT's
``### Step N:`` sections, each with the equivalent forms a correct completion may write instead.

Deterministic and dependency-free. The first alternative of every group is a substring of the step text, so the
reference CoT matches all its own groups; the other alternatives (fraction ↔ decimal ↔ LaTeX, ``\\frac{a}{b}`` ↔
``a/b``, operator symbols and spacing) are what lets the released substring matcher (preset ``r1vl``) credit a
completion that writes the same result differently.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

from r1vl_fast.rewards import normalize
from r1vl_fast.rewards.format import STEP_SECTION

# Tokens of step text. A number keeps thousands separators and decimals; ``\(``, ``$`` and other delimiters are
# "other", so they end a formula rather than being copied into it.
_TOKEN = re.compile(
    r"(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|(?<![\w.])\.\d+)"
    r"|(?P<delim>\\[()\[\]{}]|\$)"
    r"|(?P<cmd>\\[A-Za-z]+)"
    r"|(?P<word>[A-Za-z]+)"
    r"|(?P<op>[-+*/=^<>(){}\[\]_|!'°%×÷·⋅−≤≥≠≈∠√π])"
    r"|(?P<space>[ \t]+)"
    r"|(?P<other>.|\n)",
    re.DOTALL,
)
# Words that belong in a formula: single letters (variables), point names (AB, ABC), function names.
_MATH_WORDS = frozenset({"sqrt", "frac", "dfrac", "tfrac", "sin", "cos", "tan", "log", "ln", "pi", "circ"})
# LaTeX commands that may sit inside a formula; anything else (\text, \quad ...) ends it.
_MATH_COMMANDS = frozenset({
    "frac", "dfrac", "tfrac", "sqrt", "times", "cdot", "div", "pi", "circ", "angle", "left", "right", "le", "leq",
    "ge", "geq", "ne", "neq", "approx", "pm", "sin", "cos", "tan", "log", "ln", "triangle", "degree",
})
_RELATIONS = re.compile(r"\\(?:leq?|geq?|neq?|approx)(?![A-Za-z])|<=|>=|!=|[=<>≤≥≠≈]")
_OPEN, _CLOSE = "([{", ")]}"
# A figure object's name before a formula belongs to it: "angle ABC = 90°".
_NAME_BEFORE = re.compile(r"(?<![\w\\])(?:angle|triangle|arc|line|segment|side) $", re.IGNORECASE)

# Short key phrases of visual math reasoning: theorems, figure properties and chart vocabulary. Matched as whole
# words, case-insensitively; the longest phrase at a position wins.
KEY_PHRASES = tuple(sorted({
    "pythagorean theorem", "right triangle", "right angle", "isosceles triangle", "equilateral triangle",
    "similar triangles", "congruent triangles", "congruent", "parallel", "perpendicular", "angle bisector",
    "perpendicular bisector", "midpoint", "median", "altitude", "hypotenuse", "diameter", "radius", "chord",
    "circumference", "inscribed angle", "central angle", "tangent", "arc", "area", "perimeter", "volume",
    "surface area", "supplementary", "complementary", "vertical angles", "alternate interior angles",
    "corresponding angles", "exterior angle", "interior angles", "sum of angles", "triangle sum", "sine", "cosine",
    "law of sines", "law of cosines", "trigonometric ratio", "opposite side", "adjacent side", "parallelogram",
    "rectangle", "square", "rhombus", "trapezoid", "semicircle", "cylinder", "cone", "sphere", "cube", "prism",
    "average", "mean", "sum", "difference", "product", "quotient", "ratio", "proportion", "percentage",
    "probability", "slope", "intercept", "linear function", "quadratic", "vertex", "axis of symmetry", "maximum",
    "minimum", "increase", "decrease", "bar chart", "bar graph", "pie chart", "line graph", "legend", "x-axis",
    "y-axis", "highest", "lowest", "total", "remaining",
}, key=lambda p: (-len(p), p)))
_PHRASE = re.compile(r"(?<![\w-])(?:" + "|".join(re.escape(p) for p in KEY_PHRASES) + r")(?![\w-])", re.IGNORECASE)
_EMPHASIS = re.compile(r"\*\*([^*\n]{2,40})\*\*|\"([^\"\n]{2,40})\"")
_NAMED = re.compile(r"(?<![\w\\])(angle|triangle|line|segment|side|arc|circle|point|quadrilateral) ([A-Z]{1,4})\b",
                    re.IGNORECASE)


def step_sections(cot: str) -> list[str]:
    """The text of each ``### Step N:`` section (the part of a CoT the matcher searches)."""
    return STEP_SECTION.findall(cot)


# ---------------------------------------------------------------------------------------------------------------
# Equivalent forms


_ATOM = r"(?:-?\d+(?:\.\d+)?|[A-Za-z])"
_SLASH_FRACTION = re.compile(rf"(?<![\w.,}}/^])({_ATOM})\s*/\s*({_ATOM})(?![\w.{{/^]|,\d)")
_LATEX_FRACTION = re.compile(r"\\?[dt]?frac\{([^{}]+)\}\{([^{}]+)\}")
_INT_FRACTION = re.compile(r"(?<![\w.,}/^])(\d+)/(\d+)(?![\w.{/^]|,\d)")
_DECIMAL = re.compile(r"(?<![\w.,/])(\d+\.\d+)(?![\w.,/%])")
_PERCENT = re.compile(r"(?<![\w.,])(\d+(?:\.\d+)?)\s*(?:\\%|%)")
_THOUSANDS = re.compile(r"(?<![\w.,])(\d{1,3}(?:,\d{3})+)(?![\d])")
_BIG_INT = re.compile(r"(?<![\w.,])(\d{4,})(?![\w.,])")
_DEGREES = re.compile(r"(\d+(?:\.\d+)?)\s*(?:°|\^\{?\\circ\}?|\^°|\\degree| degrees\b)")
_TRAILING_ZEROS = re.compile(r"(?<![\w.])(\d+)\.(\d*?)0+(?![\d])")
_BINARY_OPS = "=+*/<>≤≥≠≈×÷"
_SPACE_AROUND_OP = re.compile(r"\s*([=+*/<>≤≥≠≈×÷]|\\(?:times|cdot|div|leq?|geq?|neq?|approx)(?![A-Za-z]))\s*")


def _wrap(arg: str) -> str:
    return arg if re.fullmatch(_ATOM, arg.strip()) else f"({arg.strip()})"


def _decimal(value: Fraction) -> str | None:
    """The exact decimal of ``value`` when it terminates within 6 places."""
    den = value.denominator
    for p in (2, 5):
        while den % p == 0:
            den //= p
    if den != 1:
        return None
    text = f"{float(value):.6f}".rstrip("0").rstrip(".")
    return text if Fraction(text) == value else None


def _small_fraction(text: str) -> Fraction | None:
    value = Fraction(text)
    return value if value.denominator != 1 and value.denominator <= 100 and value.numerator <= 100 else None


def _plain(s: str) -> str:
    """Delimiters and sizing commands dropped: ``$``, ``\\left``, ``\\right``, ``\\,``, ``\\!``."""
    s = re.sub(r"\\(?:left|right)(?![A-Za-z])|\\[,!;]|\$", "", s)
    return re.sub(r"[ \t]+", " ", s).strip()


def _ascii_ops(s: str) -> str:
    s = re.sub(r"\s*\\(?:times|cdot)(?![A-Za-z])\s*", " * ", s)
    s = re.sub(r"\s*\\div(?![A-Za-z])\s*", " / ", s)
    s = s.replace("×", "*").replace("·", "*").replace("⋅", "*").replace("÷", "/").replace("−", "-")
    return re.sub(r"\\(?:leq?)(?![A-Za-z])", "≤", re.sub(r"\\(?:geq?)(?![A-Za-z])", "≥", s))


def _times_sign(s: str) -> str:
    return re.sub(r"(?<=[\w)\s])\*(?=[\w(\s])", "×", s)


def _latex_times(s: str) -> str:
    return re.sub(r"\s*(?:\*|×)\s*", r" \\times ", s)


def compact(s: str) -> str:
    """No spaces around binary operators and relations: ``12 / 2 = 6`` → ``12/2=6``, ``5 - 3`` → ``5-3``."""
    s = _SPACE_AROUND_OP.sub(lambda m: m.group(1) if not m.group(1).startswith("\\") else m.group(1) + " ", s)
    return re.sub(r"(?<=[\w)])\s+-\s+(?=[\w(])", "-", s)


def spaced(s: str) -> str:
    """One space around binary operators and relations: ``12/2=6`` → ``12 / 2 = 6``."""
    return _SPACE_AROUND_OP.sub(lambda m: f" {m.group(1)} ", s).strip()


def relations_spaced(s: str) -> str:
    """One space around relations only, none around operators: ``12 / 2=6`` → ``12/2 = 6`` (the common style)."""
    s = compact(s)
    return re.sub(r"\s*([=<>≤≥≠≈])\s*", r" \1 ", s).strip()


def equivalent_forms(text: str, limit: int = 10) -> list[str]:
    """``text`` first, then up to ``limit - 1`` other ways of writing it that a correct completion may use.

    Rewrites: ``a/b`` ↔ ``frac{a}{b}`` (without the backslash, so it matches ``\\frac``, ``\\dfrac`` and
    ``\\tfrac``), exact fraction ↔ decimal, percent → decimal, degrees (``°``, ``^\\circ``, "degrees"), thousands
    separators, trailing zeros, ``×``/``\\times``/``\\cdot`` ↔ ``*``, ``÷``/``\\div`` ↔ ``/``, ``∠`` ↔ "angle",
    ``$``/``\\left``/``\\right`` dropped, and three operator spacings. Forms equal up to case are dropped (the
    matcher lower-cases).
    """
    forms: list[str] = []
    seen: set[str] = set()

    def add(s: str) -> None:
        s = re.sub(r"[ \t]+", " ", s).strip()
        if s and s.lower() not in seen:
            seen.add(s.lower())
            forms.append(s)

    add(text)
    plain = _plain(text)
    ascii_form = _ascii_ops(plain)
    slash = _LATEX_FRACTION.sub(lambda m: f"{_wrap(m.group(1))}/{_wrap(m.group(2))}", ascii_form)
    variants = [plain, ascii_form, slash]
    variants.append(_SLASH_FRACTION.sub(lambda m: f"frac{{{m.group(1)}}}{{{m.group(2)}}}", slash))
    # Value rewrites change only the result (the last side of an equation, or the whole of a bare number): the
    # left side of "12/2 = 6" is a computation, not a value to restate.
    relations = list(_RELATIONS.finditer(slash))
    cut = relations[-1].end() if relations else 0
    head, result = slash[:cut], slash[cut:]

    def on_result(pattern: re.Pattern[str], rewrite: Callable[[re.Match[str]], str]) -> str:
        new = pattern.sub(rewrite, result)
        if relations and normalize(new).strip() == normalize(slash[: relations[-1].start()]).strip().split("=")[-1]:
            return slash  # "3/4 = 0.75" restated as "3/4 = 3/4" says nothing
        return head + new

    variants.append(on_result(_INT_FRACTION, lambda m: _decimal(Fraction(int(m.group(1)), int(m.group(2))))
                              or m.group(0) if int(m.group(2)) else m.group(0)))
    variants.append(on_result(_DECIMAL, lambda m: str(f) if (f := _small_fraction(m.group(1))) else m.group(0)))
    variants.append(on_result(_DECIMAL, lambda m: f"frac{{{f.numerator}}}{{{f.denominator}}}"
                              if (f := _small_fraction(m.group(1))) else m.group(0)))
    variants.append(on_result(_PERCENT, lambda m: _decimal(Fraction(m.group(1)) / 100) or m.group(0)))
    # Rewrites of how a number is written (not of its value) apply everywhere.
    variants.append(_THOUSANDS.sub(lambda m: m.group(1).replace(",", ""), slash))
    variants.append(_BIG_INT.sub(lambda m: f"{int(m.group(1)):,}", slash))
    variants.append(_TRAILING_ZEROS.sub(lambda m: m.group(1) + ("." + m.group(2) if m.group(2) else ""), slash))
    if _DEGREES.search(plain):
        bare = _DEGREES.sub(r"\1", slash)
        variants += [_DEGREES.sub(r"\1°", slash), _DEGREES.sub(r"\1^\\circ", slash),
                     _DEGREES.sub(r"\1 degrees", slash), bare if relations else slash]
    variants += [_times_sign(slash), _latex_times(slash) if re.search(r"\*|×", slash) else slash]
    if "∠" in plain or re.search(r"\bangle\b", plain, re.IGNORECASE):
        variants += [re.sub(r"∠\s*", "angle ", plain), re.sub(r"\\?\bangle\s+", "∠", plain, flags=re.IGNORECASE)]
    for v in variants:
        add(v)
    has_ops = any(c in text for c in _BINARY_OPS) or "\\" in text
    if has_ops:
        for v in list(forms):
            add(relations_spaced(v))
            add(compact(v))
            add(spaced(v))
    return forms[:limit]


# ---------------------------------------------------------------------------------------------------------------
# Extraction


@dataclass
class KeyStep:
    """One extracted key step: its text as written, where it starts in the step text, and its kind."""

    text: str
    position: int
    kind: str  # "equation", "number" or "phrase"


def _balanced_trim(text: str, start: int, end: int) -> tuple[int, int]:
    """Shrink ``text[start:end]`` past spaces, dangling operators and unmatched brackets at either end."""
    while True:
        while start < end and text[start] in " \t+*/=,.;:^_<>≤≥≠≈×÷·":
            start += 1
        while end > start and text[end - 1] in " \t+-*/=,.;:^_<>≤≥≠≈×÷·(":
            end -= 1
        span = text[start:end]
        opened: list[int] = []  # positions of the brackets not closed yet
        unmatched_close = None
        for i, ch in enumerate(span):
            if ch in _OPEN:
                opened.append(i)
            elif ch in _CLOSE:
                if not opened and unmatched_close is None:
                    unmatched_close = i
                if opened:
                    opened.pop()
        depth = len(opened)
        if unmatched_close is not None:
            if unmatched_close == len(span) - 1:
                end -= 1
                continue
            if unmatched_close == 0:
                start += 1
                continue
            end = start + unmatched_close
            continue
        if depth > 0 and span[:1] in _OPEN:
            start += 1
            continue
        if depth > 0 and span[-1:] in _OPEN:
            end -= 1
            continue
        if depth > 0:  # an opening bracket in the middle closes after the run: keep what follows it
            start += opened[-1] + 1
            continue
        return start, end


def _formula_runs(section: str) -> list[tuple[int, int]]:
    """Spans of maximal runs of formula tokens (numbers, operators, variables, math commands) in one section."""
    runs: list[tuple[int, int]] = []
    start = end = None
    for m in _TOKEN.finditer(section):
        kind = m.lastgroup
        value = m.group()
        mathy = (
            kind in ("num", "op")
            or (kind == "cmd" and value[1:] in _MATH_COMMANDS)
            or (kind == "word" and (len(value) == 1 or (value.isupper() and len(value) <= 4)
                                    or value.lower() in _MATH_WORDS))
        )
        if mathy:
            if start is None:
                start = m.start()
            end = m.end()
        elif kind != "space" and start is not None:
            runs.append((start, end))  # type: ignore[arg-type]
            start = None
    if start is not None:
        runs.append((start, end))  # type: ignore[arg-type]
    return runs


def _has_digit(s: str) -> bool:
    return any(c.isdigit() for c in s)


def _top_level_relations(text: str, start: int, end: int) -> list[tuple[int, int]]:
    depth = 0
    found: list[tuple[int, int]] = []
    i = start
    while i < end:
        ch = text[i]
        if ch in "({[":
            depth += 1
        elif ch in ")}]":
            depth = max(depth - 1, 0)
        elif depth == 0 and (m := _RELATIONS.match(text, i, end)):
            found.append((m.start(), m.end()))
            i = m.end()
            continue
        i += 1
    return found


def _run_key_steps(section: str, offset: int, start: int, end: int) -> list[KeyStep]:
    start, end = _balanced_trim(section, start, end)
    if start >= end:
        return []
    relations = _top_level_relations(section, start, end)
    steps: list[KeyStep] = []
    covered: list[tuple[int, int]] = []
    if relations:
        bounds = [start] + [x for r in relations for x in r] + [end]
        sides = [(bounds[2 * i], bounds[2 * i + 1]) for i in range(len(relations) + 1)]
        for i in range(len(relations)):
            lo, hi = _balanced_trim(section, *sides[i])[0], _balanced_trim(section, *sides[i + 1])[1]
            left, right = section[lo:relations[i][0]].strip(), section[relations[i][1]:hi].strip()
            if named := _NAME_BEFORE.search(section, 0, lo):  # "angle ABC = 90°", not "ABC = 90°"
                lo = named.start()
            equation = section[lo:hi]
            if left and right and left != right and _has_digit(equation) and len(equation) <= 80:
                steps.append(KeyStep(equation, offset + lo, "equation"))
                covered.append((lo, hi))
    for m in re.finditer(r"\d+(?:[.,]\d+)*(?:/\d+(?:\.\d+)?)?\s*(?:%|°|\^\\circ)?", section[start:end]):
        lo, hi = start + m.start(), start + m.end()
        if any(a <= lo and hi <= b for a, b in covered):
            continue
        if lo > 0 and (section[lo - 1].isalpha() or section[lo - 1] in "./^_"):  # part of x2, .5 or 10^3: not alone
            continue
        number = section[lo:hi].strip().rstrip(",.")
        if number:
            steps.append(KeyStep(number, offset + lo, "number"))
    return steps


def _phrases(section: str, offset: int) -> list[KeyStep]:
    steps = [KeyStep(m.group(0), offset + m.start(), "phrase") for m in _NAMED.finditer(section)]
    steps += [KeyStep(m.group(0), offset + m.start(), "phrase") for m in _PHRASE.finditer(section)]
    for m in _EMPHASIS.finditer(section):
        phrase = (m.group(1) or m.group(2)).strip()
        if 1 <= len(phrase.split()) <= 3 and not phrase.startswith("###"):
            steps.append(KeyStep(phrase, offset + m.start(m.lastindex or 1), "phrase"))
    return steps


def extract_candidates(cot: str) -> list[KeyStep]:
    """Every equation, number and key phrase in the CoT's step sections, in order of appearance."""
    found: list[KeyStep] = []
    for m in STEP_SECTION.finditer(cot):
        section, offset = m.group(1), m.start(1)
        for start, end in _formula_runs(section):
            found += _run_key_steps(section, offset, start, end)
        found += _phrases(section, offset)
    return sorted(found, key=lambda s: s.position)


_PRIORITY = {"equation": 0, "number": 1, "phrase": 2}


def extract_key_steps(cot: str, *, max_steps: int = 8, max_forms: int = 10) -> list[list[str]]:
    """Key-step groups of one reference CoT (R1-VL-10K's ``key_steps["Steps"]``): at most ``max_steps`` groups,
    equations first, then numbers not inside a chosen equation, then phrases; duplicates (equal after the paper's
    normalisation, or a phrase inside a longer one) dropped; listed in order of appearance, each with its
    equivalent forms."""
    candidates = extract_candidates(cot)
    chosen: list[KeyStep] = []
    keys: list[str] = []
    for step in sorted(candidates, key=lambda s: (_PRIORITY[s.kind], s.position)):
        if len(chosen) == max_steps:
            break
        key = normalize(step.text).strip()
        if not key or key in keys:
            continue
        if step.kind == "number" and any(
            re.search(rf"(?<![\d.]){re.escape(key)}(?![\d.])", k) for k, c in zip(keys, chosen) if c.kind != "phrase"
        ):
            continue  # the number is already inside a chosen equation
        if step.kind == "phrase" and any(key in k for k, c in zip(keys, chosen) if c.kind == "phrase"):
            continue
        chosen.append(step)
        keys.append(key)
    chosen.sort(key=lambda s: s.position)
    return [equivalent_forms(s.text, max_forms) for s in chosen]
