"""Preference data for DPO: JSONL pairs of a preferred and a non-preferred answer to one prompt, in OpenAI's format
or TRL's, tokenized into two sequences that share the prompt, with loss on the answers' tokens only.

OpenAI: {"input": {"messages": [...], "tools": [...]}, "preferred_output": [{"role": "assistant", ...}],
"non_preferred_output": [...]}. TRL: {"prompt", "chosen", "rejected"}, each a string (plain text: the answer
follows the prompt, then EOS) or a list of messages (the chat template's).
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from transformers import PreTrainedTokenizerBase

from training.data import IGNORE, DataError, Tokenized, Turn, chat_turns, plain_completion, read_jsonl, too_few


class AssistantTurn(Turn):
    @field_validator("role")
    @classmethod
    def _assistant(cls, role: str) -> str:
        if role != "assistant":
            raise ValueError("an output's messages are the assistant's")
        return role


class PreferenceInput(BaseModel):
    model_config = ConfigDict(extra="ignore")
    messages: list[Turn] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None


class OpenAIPreference(BaseModel):
    model_config = ConfigDict(extra="ignore")
    input: PreferenceInput
    preferred_output: list[AssistantTurn] = Field(min_length=1)
    non_preferred_output: list[AssistantTurn] = Field(min_length=1)


class TRLPreference(BaseModel):
    model_config = ConfigDict(extra="ignore")
    prompt: str | list[Turn]
    chosen: str | list[AssistantTurn]
    rejected: str | list[AssistantTurn]

    @field_validator("prompt", "chosen", "rejected")
    @classmethod
    def _not_empty(cls, value: str | list) -> str | list:
        if not value or (isinstance(value, str) and not value.strip()):
            raise ValueError("is empty")
        return value


Preference = OpenAIPreference | TRLPreference


@dataclass
class PreferencePair:
    chosen: Tokenized
    rejected: Tokenized


def _preference(record: object) -> Preference:
    if isinstance(record, dict) and "input" in record:
        return OpenAIPreference.model_validate(record)
    if isinstance(record, dict) and {"prompt", "chosen", "rejected"} <= record.keys():
        preference = TRLPreference.model_validate(record)
        if isinstance(preference.prompt, str) != isinstance(preference.chosen, str) or \
                isinstance(preference.chosen, str) != isinstance(preference.rejected, str):
            raise ValueError("prompt, chosen and rejected: all strings or all message lists")
        return preference
    raise ValueError("needs `input`, `preferred_output` and `non_preferred_output` (OpenAI's preference format) "
                     "or `prompt`, `chosen` and `rejected` (TRL's)")


def _answer(tokenizer: PreTrainedTokenizerBase, prompt: list[dict], answer: list[dict],
            tools: list[dict] | None) -> Tokenized:
    """The conversation through the chat template, labels on the answer's tokens (and its end of turn)."""
    ids = tokenizer.apply_chat_template(prompt + answer, tools=tools, tokenize=True, return_dict=False)
    asked = tokenizer.apply_chat_template(prompt, tools=tools, add_generation_prompt=True, tokenize=True,
                                          return_dict=False)
    if ids[: len(asked)] != asked:  # a template that renders the prompt otherwise once answered
        raise ValueError("the chat template renders the prompt differently before and after the answer")
    return Tokenized(ids, [IGNORE] * len(asked) + ids[len(asked):])


def tokenize_pair(preference: Preference, tokenizer: PreTrainedTokenizerBase) -> PreferencePair:
    if isinstance(preference, OpenAIPreference):
        prompt, tools = chat_turns(preference.input.messages), preference.input.tools
        return PreferencePair(_answer(tokenizer, prompt, chat_turns(preference.preferred_output), tools),
                              _answer(tokenizer, prompt, chat_turns(preference.non_preferred_output), tools))
    if isinstance(preference.prompt, list):
        prompt = chat_turns(preference.prompt)
        return PreferencePair(_answer(tokenizer, prompt, chat_turns(preference.chosen), None),
                              _answer(tokenizer, prompt, chat_turns(preference.rejected), None))
    prompt_ids = tokenizer.encode(preference.prompt, add_special_tokens=False)
    return PreferencePair(plain_completion(tokenizer, prompt_ids, preference.chosen),
                          plain_completion(tokenizer, prompt_ids, preference.rejected))


def read_preferences(path: Path) -> tuple[list[Preference], list[str]]:
    """(pairs, warnings); raises DataError naming every bad line."""
    preferences = read_jsonl(path, _preference)
    return preferences, too_few(path, preferences)


def load_preferences(path: Path, tokenizer: PreTrainedTokenizerBase, max_seq_len: int
                     ) -> tuple[list[PreferencePair], list[str]]:
    """Validated, tokenized, truncated pairs and the warnings to show; raises DataError naming every bad line."""
    preferences, warnings = read_preferences(path)
    warnings += _ignored_tools(preferences, tokenizer, path)
    pairs, problems = [], []
    for number, preference in enumerate(preferences, start=1):
        try:
            pair = tokenize_pair(preference, tokenizer)
        except Exception as exc:  # noqa: BLE001 - a template's own errors (jinja, ValueError) name no line
            problems.append(f"pair {number}: the chat template cannot render it ({exc})")
            continue
        if max(len(pair.chosen.input_ids), len(pair.rejected.input_ids)) > max_seq_len:
            warnings.append(f"{path}: pair {number} has over {max_seq_len} tokens; truncated to {max_seq_len}")
            pair = PreferencePair(*(Tokenized(t.input_ids[:max_seq_len], t.labels[:max_seq_len])
                                    for t in (pair.chosen, pair.rejected)))
        if any(all(label == IGNORE for label in t.labels) for t in (pair.chosen, pair.rejected)):
            warnings.append(f"{path}: pair {number} has no answer tokens left after truncation; skipped")
            continue
        pairs.append(pair)
    if problems:
        raise DataError(path, problems)
    if not pairs:
        raise DataError(path, ["no pair is left to train on after truncation (raise max_seq_len)"])
    return pairs, warnings


def _ignored_tools(preferences: list[Preference], tokenizer: PreTrainedTokenizerBase, path: Path) -> list[str]:
    """A warning where pairs give `tools` that the model's chat template does not render."""
    given = next((p for p in preferences if isinstance(p, OpenAIPreference) and p.input.tools), None)
    if given is None:
        return []
    turns = chat_turns(given.input.messages)
    try:
        with_tools = tokenizer.apply_chat_template(turns, tools=given.input.tools, tokenize=False)
        if with_tools != tokenizer.apply_chat_template(turns, tokenize=False):
            return []
    except Exception:  # noqa: BLE001 - the template's error: its pair is named when it is tokenized
        return []
    return [f"{path}: the model's chat template does not render `tools`: they are not trained on"]
