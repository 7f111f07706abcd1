"""Structured outputs and tool calls through the official `openai` client on the real model: a constrained
row and free rows share a step, every adapter kind answers `parse()` with a valid object, bad specs are
400s naming the field, and `required` / named tool choices give valid calls even from a 135M model."""

import asyncio
import contextlib
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from pydantic import BaseModel
from transformers import AutoTokenizer

from adapter_factory import KINDS
from conftest import CHAT, MODEL, MODEL_PATH, ask, in_one_step
from server.engine.base import OutputConstraint
from server.web.protocol import ChatCompletionRequest
from server.tools import ToolPlan


class Capital(BaseModel):
    country: str
    city: str
    is_capital: bool


def _nested(depth: int) -> dict:
    """An object schema `depth` objects deep."""
    schema = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


QUESTION = ask("What is the capital of France? Answer in JSON.")
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def _schema_body(model: str) -> dict:
    schema = openai.lib._pydantic.to_strict_json_schema(Capital)
    return {"model": model, "messages": QUESTION, "temperature": 0, "max_tokens": 60,
            "response_format": {"type": "json_schema", "json_schema": {"name": "Capital", "schema": schema,
                                                                       "strict": True}}}


def test_parse_returns_an_object_for_the_base_and_every_adapter_kind(every_kind):
    _, _, client = every_kind
    for model in (MODEL, *KINDS):
        reply = client.chat.completions.parse(model=model, messages=QUESTION, response_format=Capital,
                                              max_tokens=60, temperature=0).choices[0]
        assert reply.finish_reason == "stop", (model, reply.message.content)
        assert isinstance(reply.message.parsed, Capital), model


def test_constrained_and_free_rows_share_a_step_and_keep_their_answers(every_kind):
    http, app, _ = every_kind
    free = [{"model": m, "messages": ask("Name three colours."), "temperature": 0, "max_tokens": 16}
            for m in (MODEL, "lora", "prefix")]
    constrained = [_schema_body(m) for m in (MODEL, "prompt", "bottleneck")]
    bodies = [free[0], constrained[0], free[1], constrained[1], free[2], constrained[2]]
    alone = [http.post(CHAT, json=body).json()["choices"][0]["message"]["content"] for body in bodies]
    together = [r.json()["choices"][0]["message"]["content"] for r in in_one_step(http, app, bodies)]
    assert together == alone
    for text in together[1::2]:
        Capital.model_validate_json(text)
    assert not any(text.startswith("{") for text in together[0::2])  # the free rows are not constrained


def test_json_object_and_vllms_structured_outputs(every_kind):
    _, _, client = every_kind
    answer = client.chat.completions.create(
        model=MODEL, messages=ask('Reply with a JSON object whose key "capital" holds the capital of France.'),
        response_format={"type": "json_object"}, max_tokens=40, temperature=0).choices[0]
    assert answer.finish_reason == "stop" and isinstance(json.loads(answer.message.content), dict)
    choice = client.chat.completions.create(model="lora", messages=ask("Is the sky blue?"), max_tokens=10,
                                            temperature=0, extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert choice.choices[0].message.content in {"yes", "no"}
    date = client.chat.completions.create(model=MODEL, messages=ask("Give a date."), max_tokens=20, temperature=0,
                                          extra_body={"structured_outputs": {"regex": r"\d{4}-\d{2}-\d{2}"}})
    assert len(date.choices[0].message.content) == 10 and date.choices[0].message.content[4] == "-"
    completion = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=10,
                                           temperature=0, extra_body={"structured_outputs": {"regex": " [A-Z][a-z]+"}})
    assert completion.choices[0].text.strip().isalpha()


@pytest.mark.parametrize("fields, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"structured_outputs": {"regex": "("}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"structured_outputs": {"grammar": "root ::= nothing_defined"}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a" * 100_001}}, "structured_outputs"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "structured_outputs"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}], "tool_choice": "required"},
     "tools"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(5000)}}}}},
     "response_format"),  # a schema over 100,000 characters
    # Unsatisfiable: no output matches (they were 500s, "non-finite logits", once generation began).
    ({"structured_outputs": {"grammar": "root ::= root"}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "[^\\s\\S]"}}, "structured_outputs"),
    ({"structured_outputs": {"grammar": 'root ::= "a" dead\ndead ::= dead'}}, "structured_outputs"),  # after "a"
    # Over the structural limits, refused before compiling (xgrammar took minutes over each).
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": _nested(250)}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(1001)}}}}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": _nested(33)}}],  # 67 levels
      "tool_choice": "required"}, "tools"),
    # Under `auto` nothing constrains the output, but a tool's parameters must still be a schema.
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}]}, "tools"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),  # a call could not say which of the two it is
])
def test_bad_specs_are_400s_naming_the_field(every_kind, fields, param):
    http, _, _ = every_kind
    response = http.post(CHAT, json={"model": MODEL, "messages": ask("Hi"), "max_tokens": 4, **fields})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"].startswith(param)


def _calls(message) -> list[tuple[str, dict]]:
    return [(call.function.name, json.loads(call.function.arguments)) for call in message.tool_calls]


def test_required_and_named_tool_choices_give_valid_calls(every_kind):
    _, _, client = every_kind
    ask_weather = ask("What is the weather in Paris?")
    for model in (MODEL, "lora", "prompt"):
        required = client.chat.completions.create(model=model, messages=ask_weather, tools=[WEATHER, TIME],
                                                   tool_choice="required", parallel_tool_calls=False,
                                                   max_tokens=60, temperature=0).choices[0]
        assert required.finish_reason == "tool_calls" and len(required.message.tool_calls) == 1
        (name, arguments), = _calls(required.message)
        assert name in {"get_weather", "get_time"} and "city" in arguments
    named = client.chat.completions.create(model="bottleneck", messages=ask_weather, tools=[WEATHER, TIME],
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                           max_tokens=60, temperature=0).choices[0]
    (name, arguments), = _calls(named.message)
    assert name == "get_weather" and set(arguments) == {"city", "unit"} and arguments["unit"] in {"celsius",
                                                                                                  "fahrenheit"}
    assert named.message.tool_calls[0].id.startswith("call_")
    cut = client.chat.completions.create(model=MODEL, messages=ask_weather, tools=[WEATHER], max_tokens=3,
                                         tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                         temperature=0).choices[0]
    assert cut.finish_reason == "length"  # arguments cut off by max_tokens are not a finished call


def test_a_required_call_to_a_tool_with_defs_follows_its_schema(every_kind):
    """A tool's `$defs` (as pydantic writes nested models) hold under `required` as under a named choice:
    inside the array of calls a `#/$defs/...` reference would otherwise point at nothing."""
    _, _, client = every_kind
    booking = {"type": "function", "function": {"name": "book", "parameters": {
        "$defs": {"Seat": {"type": "object", "properties": {"row": {"type": "integer"}}, "required": ["row"]}},
        "type": "object", "properties": {"seat": {"$ref": "#/$defs/Seat"}}, "required": ["seat"]}}}
    reply = client.chat.completions.create(model=MODEL, messages=ask("Book me a seat in row 3."), tools=[booking],
                                           tool_choice="required", max_tokens=40, temperature=0).choices[0]
    (name, arguments), = _calls(reply.message)
    assert name == "book" and isinstance(arguments["seat"]["row"], int)
    odd = {"type": "function", "function": {"name": "odd", "parameters": {"$defs": None, "type": "object"}}}
    assert client.chat.completions.create(model=MODEL, messages=ask("Hi"), tools=[odd], tool_choice="required",
                                          max_tokens=8).choices  # a null `$defs` was a 500 while hoisting


def test_tool_calls_stream_as_deltas(every_kind):
    _, _, client = every_kind
    stream = client.chat.completions.create(model=MODEL, messages=ask("What is the weather in Paris?"),
                                            tools=[WEATHER, TIME], tool_choice="required", max_tokens=80,
                                            temperature=0, stream=True)
    deltas, finish = [], None
    for chunk in stream:
        for choice in chunk.choices:
            deltas += choice.delta.tool_calls or []
            finish = choice.finish_reason or finish
    assert finish == "tool_calls" and deltas
    assert [d.index for d in deltas] == list(range(len(deltas)))
    for delta in deltas:
        assert delta.function.name in {"get_weather", "get_time"} and "city" in json.loads(delta.function.arguments)


def test_history_with_tool_calls_and_results_is_accepted(every_kind):
    _, _, client = every_kind
    history = [*ask("What is the weather in Paris?"),
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"}]
    reply = client.chat.completions.create(model="lora", messages=history, tools=[WEATHER], max_tokens=16,
                                           temperature=0).choices[0]
    assert reply.finish_reason in {"stop", "length"} and reply.message.content


def test_auto_parses_hermes_tool_call_blocks():
    body = ChatCompletionRequest(model=MODEL, messages=ask("x"), tools=[WEATHER, TIME])
    plan = ToolPlan.of(body)
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
            '\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"city": "Paris"}}\n</tool_call>')
    content, calls = plan.parse(text)
    assert content == "Let me check."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "unit": "celsius"}), ("get_time", {"city": "Paris"})]
    assert plan.parse("No tools needed.") == ("No tools needed.", [])
    assert plan.parse("<tool_call>not json</tool_call>")[1] == []
    single = ToolPlan.of(ChatCompletionRequest(model=MODEL, messages=ask("x"), tools=[WEATHER, TIME],
                                               parallel_tool_calls=False))
    assert len(single.parse(text)[1]) == 1
    assert ToolPlan.of(ChatCompletionRequest(model=MODEL, messages=ask("x"), tools=[WEATHER],
                                             tool_choice="none")) is None


def _chat_seconds(http: httpx.Client, body: dict) -> float:
    start = time.monotonic()
    assert http.post(CHAT, json=body).status_code == 200
    return time.monotonic() - start


def test_heavy_schemas_from_one_client_hold_up_nobody_and_stop_when_it_leaves(every_kind):
    """The probe's attack, within the structural limits: 24 distinct schemas that each take xgrammar seconds,
    from clients that give up after 2 s. They compile in a low-priority worker process, so `/ready` and another
    client's chat go on as before; the clients' leaving stops their compiles, so a simple schema sent next
    does not wait behind 24 of them."""
    http, _, _ = every_kind
    victim = {"model": MODEL, "messages": ask("Name three colours."), "temperature": 0, "max_tokens": 16}
    alone = sorted(_chat_seconds(http, victim) for _ in range(3))[1]

    def heavy(i: int) -> dict:
        schema = {"type": "object", "properties": {f"k{i}_{j}": {"type": "integer"} for j in range(900)}}
        return {"model": MODEL, "messages": ask("Hi"), "max_tokens": 4,
                "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}

    async def attack() -> None:
        async with httpx.AsyncClient(base_url=str(http.base_url), timeout=2) as client:
            async def one(i: int) -> None:
                with contextlib.suppress(httpx.TimeoutException):
                    await client.post(CHAT, json=heavy(i))
            await asyncio.gather(*map(one, range(24)))

    with ThreadPoolExecutor(1) as pool:
        attacking = pool.submit(asyncio.run, attack())
        time.sleep(0.5)
        ready = max(_seconds(lambda: http.get("/ready")) for _ in range(3))
        beside = sorted(_chat_seconds(http, victim) for _ in range(3))[1]
        attacking.result()
    assert ready < 1.0 and beside < 1.5 * alone, (ready, beside, alone)
    # Every compile went with its client: a new schema waits at most for a fresh worker process to start.
    start = time.monotonic()
    assert http.post(CHAT, json=_schema_body(MODEL)).status_code == 200
    assert time.monotonic() - start < 8


def _seconds(call) -> float:
    start = time.monotonic()
    call()
    return time.monotonic() - start


def test_an_ambiguous_grammar_fails_its_own_row_only(every_kind):
    """An ambiguous grammar's mask costs more with every token (xgrammar: 0.1 ms at the start, 100 ms by token
    60). Past --max-grammar-mask-ms (50 ms) its row fails with a 400 naming the constraint, while a row sharing
    its steps answers as it does alone."""
    http, _, _ = every_kind
    victim = {"model": MODEL, "messages": ask("Write a short poem about the sea."), "temperature": 0,
              "max_tokens": 96, "min_tokens": 96}
    alone = http.post(CHAT, json=victim).json()["choices"][0]["message"]["content"]
    aaaa = AutoTokenizer.from_pretrained(MODEL_PATH).encode("aaaa", add_special_tokens=False)[0]
    ambiguous = {"model": MODEL, "messages": ask("Hi"), "temperature": 0, "max_tokens": 300,
                 "logit_bias": {str(aaaa): 100},
                 "structured_outputs": {"grammar": 'root ::= x*\nx ::= "a" | "a" x | x "a" | "aa"'}}

    async def both() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=str(http.base_url), timeout=120) as client:
            return await asyncio.gather(client.post(CHAT, json=ambiguous), client.post(CHAT, json=victim))

    failed, answered = asyncio.run(both())
    assert failed.status_code == 400, failed.text
    assert failed.json()["error"]["param"] == "structured_outputs"
    assert "--max-grammar-mask-ms" in failed.json()["error"]["message"]
    assert answered.json()["choices"][0]["message"]["content"] == alone


def test_compiled_grammars_are_cached_per_tenant(every_kind):
    """A grammar another tenant compiled is not served from the cache: its compile time would tell who sent
    which schema."""
    _, app, _ = every_kind
    grammars = app.state.router.grammars
    constraint = OutputConstraint(kind="regex", spec="per-tenant [0-9]+")

    def compile_for(tenant: str):  # on the server's event loop, which the compile workers belong to
        return asyncio.run_coroutine_threadsafe(grammars.compile(constraint, tenant), app.state.engine._loop).result()

    first, again, other = map(compile_for, ("a", "a", "b"))
    assert again is first and other is not first
