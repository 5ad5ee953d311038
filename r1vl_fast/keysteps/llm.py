"""The LLM key-step extractor: any OpenAI-compatible chat endpoint (a local ``vllm serve``, a hosted API) is asked
to extract, refine and restate a CoT's key steps as JSON; the answer is parsed strictly, and an answer that does
not parse or whose steps are not in the solution is sent back once more with what was wrong.

Transport errors are retried by the ``openai`` client (backoff on connection errors, 429 and 5xx). If they persist,
:class:`EndpointError` stops the run: the rows written so far are kept and a rerun resumes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

SYSTEM_PROMPT = (
    "You read worked solutions to visual math questions and pick out their key steps, so that other solutions to "
    "the same question can be checked against them by text matching."
)

USER_PROMPT = """Find the key steps of the solution below.

A key step is an intermediate result or fact that any correct solution has to state: a number, an equation
such as `12/2 = 6`, or a short phrase of at most three words (a theorem, a property, an object of the figure).

Rules:
1. Copy each key step exactly as it is written in the "### Step" sections, character for character.
2. Skip the final answer line, restatements of the question, and filler.
3. After each key step, add up to four other ways a correct solution could write the same thing: fraction,
   decimal or LaTeX forms (`frac{{12}}{{2}} = 6`, `6.0`), different spacing (`12/2=6`), or a common synonym.
4. Give between 1 and {max_steps} key steps, in the order they appear.

Reply with a JSON object and nothing else, shaped like this:
{{"Steps": [["<key step as written>", "<other form>", "..."], ["<next key step>", "..."]]}}

Question:
{problem}

Solution:
{solution}"""

RETRY_PROMPT = """That reply could not be used: {problem}
Reply again with only the JSON object {{"Steps": [[...], ...]}}, and copy the first entry of each key step exactly
from the "### Step" sections."""

_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)
MAX_ALT_CHARS = 200


class AnswerError(ValueError):
    """The model's reply is not a usable list of key-step groups; the message says why (it is sent back)."""


class EndpointError(RuntimeError):
    """The endpoint kept failing after the client's retries (unreachable, 5xx, rate-limited)."""


def parse_answer(text: str, max_steps: int) -> list[list[str]]:
    """Key-step groups from a reply: a JSON object ``{"Steps": [...]}`` (or a bare list), possibly inside a code
    fence or surrounded by prose. Each group is a string or a list of strings; blank and duplicate alternatives
    are dropped. Raises :class:`AnswerError` naming what is wrong."""
    if not text or not text.strip():
        raise AnswerError("the reply is empty")
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    value: Any = None
    for candidate in candidates:
        for opener, closer in (("{", "}"), ("[", "]")):
            start, end = candidate.find(opener), candidate.rfind(closer)
            if start < 0 or end <= start:
                continue
            try:
                value = json.loads(candidate[start : end + 1])
                break
            except json.JSONDecodeError:
                continue
        if value is not None:
            break
    if value is None:
        raise AnswerError("the reply holds no JSON object")
    if isinstance(value, dict):
        steps = value.get("Steps", value.get("steps"))
        if steps is None:
            raise AnswerError(f"the JSON object has no 'Steps' list (keys: {sorted(value)[:5]})")
    else:
        steps = value
    if not isinstance(steps, list) or not steps:
        raise AnswerError("'Steps' must be a non-empty list")
    groups: list[list[str]] = []
    for g, group in enumerate(steps):
        alts = [group] if isinstance(group, str) else group
        if not isinstance(alts, list) or not all(isinstance(a, str) for a in alts):
            raise AnswerError(f"'Steps[{g}]' must be a string or a list of strings")
        clean: list[str] = []
        for alt in alts:
            alt = " ".join(alt.split())
            if len(alt) > MAX_ALT_CHARS:
                raise AnswerError(f"'Steps[{g}]' has an alternative of {len(alt)} characters (at most "
                                  f"{MAX_ALT_CHARS})")
            if alt and alt.lower() not in (c.lower() for c in clean):
                clean.append(alt)
        if not clean:
            raise AnswerError(f"'Steps[{g}]' is empty")
        groups.append(clean)
    if len(groups) > max_steps:
        raise AnswerError(f"{len(groups)} key steps, at most {max_steps} were asked for")
    return groups


@dataclass
class Attempt:
    """What one row's extraction did: the groups (None if every answer failed), replies and reasons."""

    groups: list[list[str]] | None
    replies: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


class LLMExtractor:
    """``extract(problem, cot, check)``: ask, parse, ``check(groups)`` (returns a problem or None), and ask again
    with the problem up to ``max_attempts`` times. Thread-safe: rows are extracted concurrently."""

    def __init__(self, endpoint: str, model: str, *, api_key: str = "EMPTY", max_steps: int = 8,
                 max_attempts: int = 3, temperature: float = 0.0, retry_temperature: float = 0.7,
                 max_tokens: int = 1024, timeout: float = 120.0, http_retries: int = 3) -> None:
        try:
            import openai
        except ImportError as e:
            raise ImportError("the llm extractor needs the openai client: pip install 'r1vl_fast[llm]'") from e
        self._openai = openai
        self.client = openai.OpenAI(base_url=endpoint, api_key=api_key, timeout=timeout, max_retries=http_retries)
        self.endpoint, self.model = endpoint, model
        self.max_steps, self.max_attempts = max_steps, max_attempts
        self.temperature, self.retry_temperature, self.max_tokens = temperature, retry_temperature, max_tokens

    def check_endpoint(self) -> None:
        """Fail fast, naming the endpoint, when it is unreachable or does not serve ``model``."""
        try:
            served = [m.id for m in self.client.models.list()]
        except self._openai.APIError as e:
            raise EndpointError(f"{self.endpoint}: cannot list models ({e})") from None
        if self.model not in served:
            raise EndpointError(f"{self.endpoint} does not serve model {self.model!r}; it serves {served}")

    def _ask(self, messages: list[dict[str, str]], temperature: float) -> str:
        openai = self._openai
        try:
            reply = self.client.chat.completions.create(model=self.model, messages=messages,  # type: ignore[arg-type]
                                                        temperature=temperature, max_tokens=self.max_tokens)
        except openai.BadRequestError as e:  # this row's request (e.g. too long for the context): not retried
            raise AnswerError(f"the endpoint refused the request ({e.message})") from None
        except openai.APIError as e:
            raise EndpointError(f"{self.endpoint}: {type(e).__name__}: {e}") from None
        return reply.choices[0].message.content or "" if reply.choices else ""

    def extract(self, problem: str, cot: str, check: Callable[[list[list[str]]], str | None]) -> Attempt:
        messages = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": USER_PROMPT.format(max_steps=self.max_steps, problem=problem, solution=cot)},
        ]
        attempt = Attempt(None)
        for k in range(self.max_attempts):
            try:
                reply = self._ask(messages, self.temperature if k == 0 else self.retry_temperature)
            except AnswerError as e:
                attempt.problems.append(str(e))
                return attempt
            attempt.replies.append(reply)
            try:
                groups = parse_answer(reply, self.max_steps)
                problem_found = check(groups)
                if problem_found is None:
                    attempt.groups = groups
                    return attempt
                raise AnswerError(problem_found)
            except AnswerError as e:
                attempt.problems.append(str(e))
                messages += [{"role": "assistant", "content": reply},
                             {"role": "user", "content": RETRY_PROMPT.format(problem=e)}]
        return attempt
