"""Structured outputs and tool calls through the official `openai` client on the real model: a constrained
row and free rows share a step, every adapter kind answers `parse()` with a valid object, bad specs are
400s naming the field, and `required` / named tool choices give valid calls even from a 135M model."""

import json

import openai
import pytest
from pydantic import BaseModel

from adapter_factory import KINDS
from conftest import CHAT, MODEL, ask, in_one_step
from server.web.protocol import ChatCompletionRequest
from server.tools import ToolPlan


class Capital(BaseModel):
    country: str
    city: str
    is_capital: bool


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
