"""Encoder routes: rules, fallbacks and the refusals when a models file declares a bad route."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.errors import ConfigError, UnknownNameError
from service.models.registry import MINIATURE_KIT, Registry
from service.models.routing import (DEFAULT, FALLBACK_NO_WORKER, FALLBACK_QUEUE_DEPTH, RouteSpec, asks_for_text,
                                    count_tokens, decide)
from trainer.world.captions import TEXT_TEMPLATES, WORDS, held_out_prompts, novel_prompts, parse

ENCODERS = {name: {"kind": "student", "source": "./x"} for name in ("t5-base", "t5-large", "t5-small")}
ENCODERS["t5-xxl"] = {"kind": "teacher", "source": "./x"}
ROUTE = {"rules": [{"name": "written-text", "text": True, "encoder": "t5-xxl"},
                   {"name": "fox", "regex": r"(?i)\bfox(es)?\b", "encoder": "t5-large"},
                   {"tokens_over": 12, "encoder": "t5-xxl"}],
         "default": "t5-base", "fallback": ["t5-large", "t5-xxl", "t5-base"]}


def registry(routes: dict, encoders: dict = ENCODERS) -> Registry:
    return Registry.from_dict({"encoders": encoders, "routes": routes}, base_dir=Path("/tmp"))


def refused(routes: dict, *needles: str) -> str:
    with pytest.raises(ConfigError) as info:
        registry(routes)
    for needle in needles:
        assert needle in info.value.message, info.value.message
    return info.value.message


# -- the rules -----------------------------------------------------------------------------------------------------
def test_every_miniature_text_prompt_asks_for_text_and_no_semantic_prompt_does():
    """The `text: true` rule on the miniature world's own grammar: every sign template with every word is written
    text; none of the held-out or never-seen semantic prompts (counts, shapes, relations) is."""
    for template in TEXT_TEMPLATES:
        for word in WORDS:
            assert asks_for_text(template.format(word=word)), template.format(word=word)
    prompts = held_out_prompts(300) + novel_prompts(100)
    semantic = [p for p in prompts if parse(p)["kind"] != "text"]
    assert len(semantic) > 150
    assert [p for p in prompts if asks_for_text(p) != (parse(p)["kind"] == "text")] == []


@pytest.mark.parametrize("prompt, text", [
    ('a poster with the words "OPEN LATE"', True), ("a neon sign that says ‘bar’", True),
    ("a coffee cup with a logo", True), ("a book titled The Sea", True), ("a t-shirt with the text hello", True),
    ("a dog's bone and a cat's toy", False), ("a red fox in snow", False), ("a stop sign at dusk", False),
])
def test_written_text_in_general_prompts(prompt, text):
    assert asks_for_text(prompt) is text


def test_token_count_is_words_and_marks():
    assert count_tokens("a red fox, in snow!") == 7  # a red fox , in snow !
    assert count_tokens("") == 0


def test_rules_in_order_then_the_default():
    route = registry({"auto": ROUTE}).routes["auto"]
    assert route.pick("a sign reading 'fox'") == ("t5-xxl", "written-text")  # the first matching rule wins
    assert route.pick("a red FOX") == ("t5-large", "fox")
    assert route.pick("one two three four five six seven eight nine ten eleven twelve thirteen") == \
        ("t5-xxl", "tokens-over-12")
    assert route.pick("two green triangles") == ("t5-base", DEFAULT)


# -- live workers and queues ---------------------------------------------------------------------------------------
def test_fallback_when_the_pick_has_no_live_worker():
    route = registry({"auto": ROUTE}).routes["auto"]
    decision = decide(route, "a sign reading 'cat'", serves=lambda n: n != "t5-xxl")
    assert (decision.encoder, decision.picked, decision.rule, decision.reason) == \
        ("t5-large", "t5-xxl", "written-text", FALLBACK_NO_WORKER)
    assert decision.detail == "t5-xxl: no live worker"
    # fallbacks in their order: the first one that is live
    decision = decide(route, "two green triangles", serves=lambda n: n == "t5-xxl")
    assert (decision.encoder, decision.reason) == ("t5-xxl", FALLBACK_NO_WORKER)
    assert decision.detail == "t5-base: no live worker; t5-large: no live worker"
    assert decide(route, "two green triangles", serves=lambda n: False) is None


def test_fallback_when_the_queue_is_deeper_than_the_bound():
    route = registry({"auto": {**ROUTE, "max_queue_depth": 3}}).routes["auto"]
    depth = {"t5-base": 4, "t5-large": 3, "t5-xxl": 0}
    decision = decide(route, "two green triangles", depth=depth.__getitem__)
    assert (decision.encoder, decision.reason) == ("t5-large", FALLBACK_QUEUE_DEPTH)
    assert decision.detail == "t5-base: 4 jobs waiting > max_queue_depth 3"
    # every candidate too deep: the least deep takes the job (first in order on a tie), not a refusal
    deep = {"t5-base": 9, "t5-large": 7, "t5-xxl": 7}
    decision = decide(route, "two green triangles", depth=deep.__getitem__)
    assert (decision.encoder, decision.reason) == ("t5-large", FALLBACK_QUEUE_DEPTH)
    # at or under the bound: the pick itself
    assert decide(route, "two green triangles", depth=lambda n: 3).encoder == "t5-base"


def test_same_prompt_same_workers_same_decision():
    route = registry({"auto": ROUTE}).routes["auto"]
    alive = {"t5-large", "t5-base"}.__contains__
    decisions = {decide(route, "a sign reading 'cat'", serves=alive).model_dump_json() for _ in range(20)}
    assert len(decisions) == 1


def test_linear_time_regex_on_a_long_adversarial_prompt():
    """`(a+)+$` backtracks exponentially in Python's re on 'aaa...!'; RE2 matches it in linear time."""
    route = registry({"r": {"rules": [{"regex": r"(a+)+$", "encoder": "t5-large"}], "default": "t5-base",
                            "fallback": ["t5-xxl"]}}).routes["r"]
    assert route.pick("a" * 100_000 + "!") == ("t5-base", DEFAULT)
    assert route.pick("a" * 100_000) == ("t5-large", "regex")


# -- refused when the models file loads ----------------------------------------------------------------------------
def test_unknown_encoder_is_refused_with_the_names():
    refused({"auto": {**ROUTE, "default": "t5-tiny"}}, "routes.auto", "unknown encoder 't5-tiny'", "t5-base")


@pytest.mark.parametrize("pattern, reason", [
    (r"(a", "missing )"), (r"(a)\1", "invalid escape"), (r"(?<=a)b", "invalid perl operator"),
    (r"((a{100}){100}){100}", "repetition"), ("x" * 1001, "the limit is 1000"),
])
def test_a_regex_that_does_not_compile_or_is_too_large_is_refused(pattern, reason):
    refused({"auto": {**ROUTE, "rules": [{"regex": pattern, "encoder": "t5-xxl"}]}}, "routes.auto.rules.0", reason)


def test_a_route_shadowing_an_encoder_is_refused():
    refused({"t5-base": ROUTE}, "routes.t5-base", "shadows the encoder 't5-base'")


@pytest.mark.parametrize("target", ["auto", "other"])
def test_a_route_naming_a_route_is_refused_as_a_possible_cycle(target):
    routes = {"auto": {**ROUTE, "fallback": ["t5-large", target]},
              "other": {"default": "t5-base", "fallback": ["auto"]}}
    refused(routes, "cycle", f"names the route {target!r}")


def test_empty_or_repeated_fallbacks_are_refused():
    refused({"auto": {**ROUTE, "fallback": []}}, "routes.auto", "`fallback` is empty")
    refused({"auto": {**ROUTE, "fallback": ["t5-large", "t5-xxl", "t5-large"]}}, "t5-large more than once")
    refused({"auto": {k: v for k, v in ROUTE.items() if k != "fallback"}}, "routes.auto.fallback", "required")


def test_a_rule_needs_exactly_one_condition_and_its_own_name():
    refused({"auto": {**ROUTE, "rules": [{"encoder": "t5-xxl"}]}}, "exactly one of", "got none")
    refused({"auto": {**ROUTE, "rules": [{"text": True, "tokens_over": 3, "encoder": "t5-xxl"}]}},
            "exactly one of", "text, tokens_over")
    refused({"auto": {**ROUTE, "rules": [{"name": "default", "text": True, "encoder": "t5-xxl"}]}}, "reserved")
    refused({"auto": {**ROUTE, "rules": [{"text": True, "encoder": "t5-xxl"}, {"text": True, "encoder": "t5-base"}]}},
            "rule names repeat: text")


def test_an_unknown_name_in_a_request_lists_encoders_and_routes():
    with pytest.raises(UnknownNameError) as info:
        registry({"auto": ROUTE}).route("fast")
    assert "unknown encoder 'fast'" in info.value.message and "routes: auto" in info.value.message
    assert info.value.http_status == 422


def test_the_shipped_kits_route_text_to_the_teacher_and_the_rest_to_t5_base(registry):
    for reg in (Registry.from_file(MINIATURE_KIT), registry):
        route = reg.routes["auto"]
        assert route.pick("a sign reading 'cat'") == (reg.teacher.name, "written-text")
        assert route.pick("two green triangles") == ("t5-base", DEFAULT)
        assert set(route.encoders) <= set(reg.encoders)
    example = Registry.from_file(Path(__file__).parents[2] / "models.example.yaml").routes["auto"]
    assert example.pick("a sign reading 'cat'")[0] == "t5-xxl-int8" and example.max_queue_depth == 64
    assert isinstance(example, RouteSpec)
