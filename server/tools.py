"""Tool calls: the tools in the prompt, and the model's output back into OpenAI `tool_calls`.

Prompts: a chat template that knows tools renders them (transformers' `tools=`); for one that does not
(SmolLM2's), they go into the system prompt in the Hermes format (Qwen 2.5, Hermes 2/3, NousResearch):
the function signatures in <tools></tools>, calls as <tool_call>{"name", "arguments"}</tool_call>,
results as <tool_response></tool_response> turns.

Output, per tool_choice:
- `auto`: parsed with the Hermes parser (vLLM's `hermes`), the only format supported: every
  <tool_call> block with valid JSON is a call, the text around them the content.
- `required` / a named function: constrained with the structured-output machinery to a JSON array of
  calls (vLLM's approach), or to the named function's arguments, so even a small model emits a valid call.
- `none`: the tools are left out of the prompt and nothing is parsed.
"""

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from server.engine.base import OutputConstraint
from server.web.protocol import CalledFunction, ChatCompletionRequest, ChatMessage, Tool, ToolCall

_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

_HERMES_SYSTEM = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> \
XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _arguments(text: str):
    """A call's arguments for a template: the JSON object when it parses, else the text as sent."""
    try:
        return json.loads(text)
    except ValueError:
        return text


@dataclass
class ToolPlan:
    tools: list[Tool]
    choice: str  # "auto", "required" or the name of the one function to call
    parallel: bool

    @classmethod
    def of(cls, body: ChatCompletionRequest) -> "ToolPlan | None":
        """None when no tool is in play (none given, or tool_choice "none"). Raises ValueError naming a
        tool_choice that does not fit the tools."""
        choice = body.tool_choice or ("auto" if body.tools else "none")
        if not isinstance(choice, str):
            choice = choice.function.name
            if not any(t.function.name == choice for t in body.tools or []):
                raise ValueError(f"tool_choice names `{choice}`, which is not in tools")
        if choice == "none" or not body.tools:
            if choice not in ("none", "auto"):
                raise ValueError(f"tool_choice {choice!r} needs tools")
            return None
        return cls(body.tools, choice, body.parallel_tool_calls)

    # -- prompt ------------------------------------------------------------------------------------------

    def render_tools(self, conversation: list[dict], template_knows_tools: bool) -> dict:
        """Arguments for apply_chat_template: `tools=` for a template that knows them, else the Hermes system
        prompt added to (or put before) the conversation's system message."""
        tools = [t.model_dump(exclude_none=True) for t in self.tools]
        if template_knows_tools:
            return {"tools": tools}
        section = _HERMES_SYSTEM.format(tools="\n".join(json.dumps(t) for t in tools))
        if conversation and conversation[0]["role"] == "system":
            conversation[0] = {**conversation[0], "content": f"{conversation[0]['content']}\n\n{section}"}
        else:
            conversation.insert(0, {"role": "system", "content": section})
        return {}

    # -- output ------------------------------------------------------------------------------------------

    def constraint(self) -> OutputConstraint | None:
        """`required`: an array of calls to the given functions, one at most without parallel calls and as
        many as there are tools with them (a bound: a small model can otherwise add calls until max_tokens);
        a named function: its arguments object. `auto` is free text."""
        if self.choice == "auto":
            return None
        if self.choice != "required":
            function = next(t.function for t in self.tools if t.function.name == self.choice)
            return OutputConstraint(kind="json", spec=json.dumps(function.parameters))
        definitions: dict = {}
        calls = {"anyOf": [{"type": "object", "properties": {"name": {"const": t.function.name},
                                                             "arguments": _hoisted(t, definitions)},
                            "required": ["name", "arguments"], "additionalProperties": False} for t in self.tools]}
        array = {"type": "array", "items": calls, "minItems": 1, "maxItems": len(self.tools) if self.parallel else 1}
        return OutputConstraint(kind="json", spec=json.dumps({**array, "$defs": definitions}))

    def check_types(self) -> None:
        """Under `auto` nothing compiles the tools' parameters (the calls are free text), but each `type` in them
        must still be a JSON Schema type: raises ValueError naming the tool otherwise. Only that, cheaply: a
        schema xgrammar cannot compile may still describe a call well."""
        for tool in self.tools:
            stack = [tool.function.parameters]  # schemas (and lists of them) only
            while stack:
                node = stack.pop()
                if isinstance(node, list):
                    stack.extend(node)
                    continue
                if not isinstance(node, dict):
                    continue
                kinds = node.get("type", [])
                for kind in kinds if isinstance(kinds, list) else [kinds]:
                    if not isinstance(kind, str) or kind not in _JSON_TYPES:
                        raise ValueError(f"tool `{tool.function.name}`: {kind!r} is not a JSON Schema type")
                for key, value in node.items():
                    if key in _NAME_MAPS and isinstance(value, dict):  # names to schemas
                        stack.extend(value.values())
                    elif key not in _DATA_KEYWORDS:
                        stack.append(value)

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) from the generated text; no calls: the text is the content."""
        if self.choice == "required":
            try:
                return None, self._calls(json.loads(text))
            except ValueError:  # cut off by max_tokens: what there is stays text
                return text, []
        if self.choice != "auto":
            return None, [ToolCall(id=_call_id(), function=CalledFunction(name=self.choice, arguments=text))]
        found = []
        for block in _HERMES_CALL.findall(text):
            try:
                found.append(json.loads(block))
            except ValueError:
                continue  # a malformed block stays in the content
        calls = self._calls([c for c in found if isinstance(c, dict) and isinstance(c.get("name"), str)])
        if not calls:
            return text, []
        content = _HERMES_CALL.sub("", text).strip()
        return content or None, calls if self.parallel else calls[:1]

    @staticmethod
    def _calls(items: list[dict]) -> list[ToolCall]:
        return [ToolCall(id=_call_id(), function=CalledFunction(
            name=item["name"], arguments=json.dumps(item.get("arguments", {})))) for item in items]


def _hoisted(tool: Tool, definitions: dict) -> dict:
    """A reference to the tool's parameters, moved whole into `definitions` under the tool's name, their local
    references (`#...`) rewritten to point there: inside the `required` array's schema, `#/$defs/X` would be
    resolved from that schema's root, not the tool's."""
    name = tool.function.name  # [A-Za-z0-9_-]: nothing to escape in a JSON pointer

    def rewrite(node: Any) -> Any:
        if isinstance(node, dict):
            return {key: (f"#/$defs/{name}{value[1:]}" if key == "$ref" and isinstance(value, str)
                          and value.startswith("#") else value if key in _DATA_KEYWORDS else rewrite(value))
                    for key, value in node.items()}
        if isinstance(node, list):
            return [rewrite(item) for item in node]
        return node

    definitions[name] = rewrite(tool.function.parameters)
    return {"$ref": f"#/$defs/{name}"}


_DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples"})  # values there are data, not schemas
_JSON_TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})
_NAME_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})


def render_message(message: ChatMessage, template_knows_tools: bool) -> dict:
    """One history message as the chat template takes it: tool calls and results in the template's own
    terms when it knows tools, else written out in the Hermes format."""
    text = message.text()
    role = "system" if message.role == "developer" else message.role
    if message.role == "assistant" and message.tool_calls:
        if template_knows_tools:
            return {"role": role, "content": text, "tool_calls": [
                {"id": c.id, "type": "function",
                 "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                for c in message.tool_calls]}
        calls = "\n".join(f'<tool_call>\n{{"name": {json.dumps(c.function.name)}, "arguments": '
                          f'{c.function.arguments}}}\n</tool_call>' for c in message.tool_calls)
        return {"role": role, "content": f"{text}\n{calls}".strip()}
    if message.role == "tool":
        if template_knows_tools:
            return {"role": "tool", "content": text, "tool_call_id": message.tool_call_id}
        return {"role": "user", "content": f"<tool_response>\n{text}\n</tool_response>"}
    return {"role": role, "content": text}
