"""Training data is checked line by line before anything is trained or written."""

import json

import pytest
from transformers import AutoTokenizer

from conftest import MODEL_PATH
from training.config import TrainConfig
from training.data import IGNORE, DataError, load_dataset, read_examples
from training.recipe import train

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there!"}]}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MODEL_PATH)


def _write(tmp_path, lines: list, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_every_problem_is_reported_with_its_line(tmp_path):
    path = _write(tmp_path, [
        GOOD,
        "{not json",
        {"text": "no messages here"},
        {"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "user", "content": "   "}, {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"prompt": "p", "completion": ""},
    ])
    with pytest.raises(DataError) as caught:
        read_examples(path)
    problems = caught.value.problems
    assert [p.split(":")[0] for p in problems] == [f"line {n}" for n in range(2, 8)]
    assert "not valid JSON" in problems[0]
    assert "needs `messages`" in problems[1]
    assert "messages.0.role" in problems[2]
    assert "content is empty" in problems[3]
    assert "no assistant message" in problems[4]
    assert "completion is empty" in problems[5]


def test_a_bad_file_fails_fast_and_writes_nothing(tmp_path):
    bad = _write(tmp_path, [GOOD, "{oops"])
    out = tmp_path / "out"
    with pytest.raises(DataError, match="line 2"):
        train(TrainConfig(method="lora", data=bad, out=out))
    assert not out.exists()


def test_few_examples_and_long_ones_are_warned_about(tmp_path, tokenizer):
    long = {"messages": [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok"}]}
    path = _write(tmp_path, [GOOD, long])
    dataset, warnings = load_dataset(path, tokenizer, max_seq_len=64)
    assert any("only 2 examples" in w for w in warnings)
    # The long example lost its assistant tokens to truncation, so it is skipped, not trained as noise.
    assert any("example 2 has" in w and "truncated to 64" in w for w in warnings)
    assert len(dataset) == 1 and all(len(item.input_ids) <= 64 for item in dataset)


def test_loss_only_on_assistant_tokens(tmp_path, tokenizer):
    two_turns = {"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye!"}]}
    path = _write(tmp_path, [two_turns, {"prompt": "The sky is", "completion": " blue."}])
    (chat, completion), _ = load_dataset(path, tokenizer, max_seq_len=512)
    learned = tokenizer.decode([t for t, label in zip(chat.input_ids, chat.labels) if label != IGNORE])
    assert learned == "Hello!<|im_end|>\nGoodbye!<|im_end|>\n"
    learned = tokenizer.decode([t for t, label in zip(completion.input_ids, completion.labels) if label != IGNORE])
    assert learned == " blue.<|im_end|>"
