"""Encoder routes: `encoder=auto` (or any route name) picks, per prompt, the cheapest encoder that serves it well.

A route is a named, ordered policy over registered encoders, declared in the models file::

    routes:
      auto:
        rules:                              # the first rule that matches picks the encoder
          - {name: written-text, text: true, encoder: t5-xxl-int8}    # quoted words, "a sign reading ...", ...
          - {name: long-prompt, tokens_over: 60, encoder: t5-xxl}     # more words and marks than the bound
          - {name: logo, regex: "(?i)\\blogo\\b", encoder: t5-xxl}    # RE2 syntax, searched in the prompt
        default: t5-base                    # when no rule matches
        fallback: [t5-large, t5-xxl-int8, t5-xxl]   # in order, when the pick has no live worker or a deep queue
        max_queue_depth: 32                 # optional: jobs waiting for an encoder beyond which it is passed over

Routing happens in the API before a job is queued, with no model loaded: rules read the prompt's text only. Regular
expressions run on RE2 (google-re2), whose matching time is linear in the prompt's length whatever the pattern, so no
rule can stall the API on a long prompt; a pattern RE2 cannot compile (back-references, look-arounds, a program
larger than `REGEX_MAX_MEM`) is refused when the models file loads. The decision is a pure function of the prompt,
the set of live workers and the queue depths: the same prompt with the same workers alive routes the same way.

No torch here: the API imports this module.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property
from typing import Literal

import re2
from pydantic import BaseModel, ConfigDict, Field, model_validator

# Reasons a decision records (and the `reason` label of t2i_route_decisions_total), besides a rule's own name.
DEFAULT = "default"
FALLBACK_NO_WORKER = "fallback-no-worker"
FALLBACK_QUEUE_DEPTH = "fallback-queue-depth"
RESERVED_RULE_NAMES = (DEFAULT, FALLBACK_NO_WORKER, FALLBACK_QUEUE_DEPTH)

REGEX_MAX_CHARS = 1000
REGEX_MAX_MEM = 1 << 20  # bytes of RE2 program per pattern; beyond it the pattern is refused at load

# Written text asked for: a quoted span (straight or curly quotes, opening after a space or a colon), or a phrase
# that introduces words to be drawn. Case-insensitive, RE2.
WRITTEN_TEXT = (
    r"(?i)(?:^|[\s:(])(?:'[^'\n]+'|\"[^\"\n]+\"|“[^”\n]+”|‘[^’\n]+’)(?:$|[^\pL\pN])"
    r"|\b(?:reading|reads|says|saying|spells?|spelled|spelling|written|writing|inscribed|inscription|lettering"
    r"|typography|caption(?:ed)?|label(?:l?ed)|titled|headline|slogan|logo|the (?:text|words?|letters?))\b"
)
TOKEN = r"\w+|[^\w\s]"  # a word or a punctuation mark: T5's tokenizer splits a prompt into at least this many


def _options() -> re2.Options:
    options = re2.Options()
    options.log_errors = False
    options.max_mem = REGEX_MAX_MEM
    return options


def compile_pattern(pattern: str) -> re2._Regexp:
    """An RE2 pattern, or ValueError with RE2's reason."""
    if len(pattern) > REGEX_MAX_CHARS:
        raise ValueError(f"has {len(pattern)} characters; the limit is {REGEX_MAX_CHARS}")
    try:
        return re2.compile(pattern, _options())
    except re2.error as exc:
        reason = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise ValueError(f"does not compile under RE2 (linear-time matching; no back-references or "
                         f"look-arounds): {reason}") from None


_WRITTEN_TEXT = compile_pattern(WRITTEN_TEXT)
_TOKEN = compile_pattern(TOKEN)


def asks_for_text(prompt: str) -> bool:
    """Whether the prompt asks for written text (quoted words, "a sign reading ...", "the word ...", a logo)."""
    return _WRITTEN_TEXT.search(prompt) is not None


def count_tokens(prompt: str) -> int:
    """Words and punctuation marks in the prompt: a lower bound of its T5 token count, with no tokenizer loaded."""
    return sum(1 for _ in _TOKEN.finditer(prompt))


class RouteRule(BaseModel):
    """One rule of a route: exactly one condition (`text`, `regex` or `tokens_over`) and the encoder it picks."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str | None = Field(None, min_length=1, max_length=40, pattern=r"^[a-z0-9][a-z0-9_.-]*$",
                             description="Recorded with each job and in metrics; default: the condition's kind.")
    encoder: str = Field(description="The registered encoder this rule picks.")
    text: Literal[True] | None = Field(None, description="Matches a prompt that asks for written text.")
    regex: str | None = Field(None, description="Matches a prompt where this RE2 pattern is found.")
    tokens_over: int | None = Field(None, ge=1, le=100_000,
                                    description="Matches a prompt of more words and punctuation marks than this.")

    @model_validator(mode="after")
    def _one_condition(self) -> "RouteRule":
        given = [k for k in ("text", "regex", "tokens_over") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"a rule needs exactly one of `text: true`, `regex`, `tokens_over`; got "
                             f"{', '.join(given) or 'none'}")
        if self.regex is not None:
            try:
                self._compiled  # compiled once, here, and kept for matching
            except ValueError as exc:
                raise ValueError(f"regex {self.regex!r} {exc}") from None
        if self.name in RESERVED_RULE_NAMES:
            raise ValueError(f"rule name {self.name!r} is reserved ({', '.join(RESERVED_RULE_NAMES)})")
        return self

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        return "text" if self.text else "regex" if self.regex is not None else f"tokens-over-{self.tokens_over}"

    @cached_property
    def _compiled(self):
        return compile_pattern(self.regex) if self.regex is not None else None

    def matches(self, prompt: str) -> bool:
        if self.text:
            return asks_for_text(prompt)
        if self._compiled is not None:
            return self._compiled.search(prompt) is not None
        return count_tokens(prompt) > self.tokens_over

    def describe(self) -> str:
        condition = ("asks for written text" if self.text else f"matches /{self.regex}/" if self.regex is not None
                     else f"has more than {self.tokens_over} tokens")
        return f"{self.label}: {condition} -> {self.encoder}"


class RouteSpec(BaseModel):
    """A named policy: rules in order, a default, and the fallbacks tried when the pick cannot take the job now."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    rules: list[RouteRule] = Field(default_factory=list, max_length=32)
    default: str = Field(description="The encoder when no rule matches.")
    fallback: list[str] = Field(description="Encoders tried in order when the pick has no live worker serving the "
                                            "pipeline or more than `max_queue_depth` jobs waiting.", max_length=16)
    max_queue_depth: int | None = Field(None, ge=0, le=1_000_000,
                                        description="Jobs waiting for an encoder beyond which it is passed over; "
                                                    "default: only a missing worker makes a route fall back.")

    @model_validator(mode="after")
    def _fallback(self) -> "RouteSpec":
        if not self.fallback:
            raise ValueError("`fallback` is empty: name at least one encoder to use when the pick has no live worker")
        repeated = sorted({n for n in self.fallback if self.fallback.count(n) > 1})
        if repeated:
            raise ValueError(f"`fallback` names {', '.join(repeated)} more than once")
        labels = [r.label for r in self.rules]
        twice = sorted({n for n in labels if labels.count(n) > 1})
        if twice:
            raise ValueError(f"rule names repeat: {', '.join(twice)} (give each rule its own `name`)")
        return self

    @property
    def encoders(self) -> list[str]:
        """Every name the route refers to, rules first."""
        return list(dict.fromkeys([r.encoder for r in self.rules] + [self.default] + self.fallback))

    def pick(self, prompt: str) -> tuple[str, str]:
        """(encoder, reason) from the prompt alone: the first matching rule's encoder, else the default."""
        for rule in self.rules:
            if rule.matches(prompt):
                return rule.encoder, rule.label
        return self.default, DEFAULT


class Decision(BaseModel):
    """What a route decided for one job; stored with the job (`routing` in its view)."""

    route: str
    encoder: str = Field(description="The encoder the job runs on.")
    picked: str = Field(description="What the rules (or the default) chose, before any fallback.")
    rule: str = Field(description="The rule that matched, or `default`.")
    reason: str = Field(description="The rule's name, `default`, or `fallback-no-worker` / `fallback-queue-depth` "
                                    "when the job runs on a fallback.")
    detail: str | None = Field(None, description="Why the encoders before it were passed over.")


def decide(route: RouteSpec, prompt: str, *, serves: Callable[[str], bool] = lambda name: True,
           depth: Callable[[str], int] = lambda name: 0) -> Decision | None:
    """Route one prompt. `serves(encoder)`: a live worker serves it with the job's pipeline; `depth(encoder)`: jobs
    waiting for it. The pick, then each fallback in order, is taken if served and not deeper than the route's bound;
    when every served candidate is too deep, the least deep (first in order on a tie) takes the job. None when no
    candidate is served at all."""
    picked, rule = route.pick(prompt)
    candidates = list(dict.fromkeys([picked, *route.fallback]))
    served = [name for name in candidates if serves(name)]
    if not served:
        return None
    passed: list[str] = [f"{name}: no live worker" for name in candidates[: candidates.index(served[0])]]
    bound = route.max_queue_depth
    chosen, why = served[0], FALLBACK_NO_WORKER
    if bound is not None:
        depths = {name: depth(name) for name in served}
        shallow = [name for name in served if depths[name] <= bound]
        chosen = shallow[0] if shallow else min(served, key=lambda n: (depths[n], served.index(n)))
        passed = [f"{name}: no live worker" if name not in depths else f"{name}: {depths[name]} jobs waiting > "
                  f"max_queue_depth {bound}" for name in candidates[: candidates.index(chosen)]]
        if chosen != served[0] or not shallow:
            why = FALLBACK_QUEUE_DEPTH
    if chosen == picked:
        return Decision(route=route.name, encoder=chosen, picked=picked, rule=rule, reason=rule,
                        detail="; ".join(passed) or None)
    return Decision(route=route.name, encoder=chosen, picked=picked, rule=rule, reason=why, detail="; ".join(passed))
