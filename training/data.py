"""Training data: chat JSONL in, token ids with loss only on the assistant's tokens out.

Every problem in a file is reported with its line number before anything is trained or written.
"""

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator
from transformers import PreTrainedTokenizerBase

IGNORE = -100  # label of tokens that carry no loss
MIN_EXAMPLES = 10
# One example's line: far beyond any context a model trains on (1 MB of text is some 250,000 tokens), and a
# bound on what tokenizing one line may cost (a 50 MB line once took the trainer to 6.6 GB).
MAX_EXAMPLE_CHARS = 1_000_000


class DataError(ValueError):
    def __init__(self, path: Path, problems: list[str]):
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        super().__init__(f"{path}: {len(problems)} problem(s)\n  " + "\n  ".join(shown))
        self.problems = problems


class Turn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str

    @field_validator("content")
    @classmethod
    def _not_empty(cls, content: str) -> str:
        if not content.strip():
            raise ValueError("content is empty")
        return content


class ChatExample(BaseModel):
    model_config = ConfigDict(extra="ignore")
    messages: list[Turn]

    @model_validator(mode="after")
    def _has_assistant(self) -> "ChatExample":
        if not any(t.role == "assistant" for t in self.messages):
            raise ValueError("no assistant message to learn from")
        return self


class CompletionExample(BaseModel):
    model_config = ConfigDict(extra="ignore")
    prompt: str
    completion: str

    @field_validator("completion")
    @classmethod
    def _not_empty(cls, completion: str) -> str:
        if not completion.strip():
            raise ValueError("completion is empty")
        return completion


Example = ChatExample | CompletionExample


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]  # IGNORE outside the assistant's tokens


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


def read_jsonl(path: Path, parse: Callable[[object], BaseModel]) -> list:
    """Each non-empty line of a JSONL file through `parse` (which raises ValueError or ValidationError naming
    what is wrong); raises DataError listing every bad line, or that the file holds nothing."""
    records: list = []
    problems: list[str] = []
    try:
        lines = path.read_text(encoding="utf-8").split("\n")  # not splitlines: U+2028 may sit inside a string
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(path, [f"cannot be read: {exc}"]) from exc
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if len(line) > MAX_EXAMPLE_CHARS:
            problems.append(f"line {number}: {len(line):,} characters; an example may have at most "
                            f"{MAX_EXAMPLE_CHARS:,}")
            continue
        try:
            records.append(parse(json.loads(line)))
        except json.JSONDecodeError as exc:
            problems.append(f"line {number}: not valid JSON ({exc.msg})")
        except RecursionError:  # Python's JSON parser recurses per level: 100,000 `[` exhaust its stack
            problems.append(f"line {number}: nested too deeply")
        except ValidationError as exc:
            problems.append(f"line {number}: {_describe(exc)}")
        except ValueError as exc:
            problems.append(f"line {number}: {exc}")
    if problems:
        raise DataError(path, problems)
    if not records:
        raise DataError(path, ["holds no examples"])
    return records


def too_few(path: Path, records: list) -> list[str]:
    """The warning for a small file, if it is one."""
    return [f"{path}: only {len(records)} examples; {MIN_EXAMPLES} or more are recommended"] \
        if len(records) < MIN_EXAMPLES else []


def _example(record: object) -> Example:
    if not isinstance(record, dict) or not ("messages" in record or {"prompt", "completion"} <= record.keys()):
        raise ValueError("needs `messages` (chat format) or `prompt` and `completion`")
    return (ChatExample if "messages" in record else CompletionExample).model_validate(record)


def read_examples(path: Path) -> tuple[list[Example], list[str]]:
    """(examples, warnings); raises DataError listing every bad line."""
    examples = read_jsonl(path, _example)
    return examples, too_few(path, examples)


def _chat_ids(tokenizer: PreTrainedTokenizerBase, turns: list[dict], generation_prompt: bool) -> list[int]:
    return tokenizer.apply_chat_template(turns, add_generation_prompt=generation_prompt, tokenize=True,
                                         return_dict=False)


def chat_turns(turns: list[Turn]) -> list[dict]:
    """Turns as the chat template takes them (OpenAI's `developer` is the template's `system`)."""
    return [{"role": "system" if t.role == "developer" else t.role, "content": t.content} for t in turns]


def plain_completion(tokenizer: PreTrainedTokenizerBase, prompt: list[int], completion: str) -> Tokenized:
    """A plain-text prompt's tokens, then the completion's and EOS, labels on the completion and EOS."""
    ids = tokenizer.encode(completion, add_special_tokens=False) + [tokenizer.eos_token_id]
    return Tokenized(prompt + ids, [IGNORE] * len(prompt) + ids)


def tokenize(example: Example, tokenizer: PreTrainedTokenizerBase) -> Tokenized:
    """Chat: the model's chat template, labels on each assistant turn (and its end-of-turn token).
    Prompt/completion: plain text, labels on the completion and EOS."""
    if isinstance(example, CompletionExample):
        return plain_completion(tokenizer, tokenizer.encode(example.prompt, add_special_tokens=False),
                                example.completion)
    turns = chat_turns(example.messages)
    input_ids = _chat_ids(tokenizer, turns, generation_prompt=False)
    labels = [IGNORE] * len(input_ids)
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        start = len(_chat_ids(tokenizer, turns[:i], generation_prompt=True)) if i else 0
        end = len(_chat_ids(tokenizer, turns[: i + 1], generation_prompt=False))
        labels[start:end] = input_ids[start:end]
    return Tokenized(input_ids, labels)


def load_dataset(path: Path, tokenizer: PreTrainedTokenizerBase, max_seq_len: int) -> tuple[list[Tokenized], list[str]]:
    """Validated, tokenized, truncated examples and the warnings to show."""
    examples, warnings = read_examples(path)
    dataset = []
    for number, example in enumerate(examples, start=1):
        item = tokenize(example, tokenizer)
        if len(item.input_ids) > max_seq_len:
            warnings.append(f"{path}: example {number} has {len(item.input_ids)} tokens; truncated to {max_seq_len}")
            item = Tokenized(item.input_ids[:max_seq_len], item.labels[:max_seq_len])
        if all(label == IGNORE for label in item.labels):
            warnings.append(f"{path}: example {number} has no assistant tokens left after truncation; skipped")
            continue
        dataset.append(item)
    if not dataset:
        raise DataError(path, ["no example is left to train on after truncation (raise max_seq_len)"])
    return dataset, warnings


def batches(dataset: list, batch_size: int, generator: torch.Generator | None = None) -> list[list]:
    """The dataset in batches: shuffled by `generator`, else in order."""
    order = torch.randperm(len(dataset), generator=generator).tolist() if generator else range(len(dataset))
    items = [dataset[i] for i in order]
    return [items[i : i + batch_size] for i in range(0, len(items), batch_size)]


def collate(batch: list[Tokenized], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels of one batch."""
    width = max(len(item.input_ids) for item in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, item in enumerate(batch):
        n = len(item.input_ids)
        input_ids[row, :n] = torch.tensor(item.input_ids)
        labels[row, :n] = torch.tensor(item.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
