"""Chat and text completions through the official openai client, greedy and sampled."""

from conftest import MODEL, ask

CAPITAL = ask("What is the capital of France?")


def test_chat_answers_capital_of_france(oai, http):
    reply = oai.chat.completions.create(model=MODEL, messages=CAPITAL, temperature=0)
    choice = reply.choices[0]
    assert "Paris" in choice.message.content
    assert choice.finish_reason == "stop"
    assert reply.object == "chat.completion" and reply.model == MODEL
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.usage.prompt_tokens > 10 and reply.usage.completion_tokens > 3


def test_stream_deltas_concatenate_to_non_stream_text(oai):
    whole = oai.chat.completions.create(model=MODEL, messages=CAPITAL, temperature=0, max_tokens=40)
    chunks = list(oai.chat.completions.create(model=MODEL, messages=CAPITAL, temperature=0, max_tokens=40,
                                              stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_max_tokens_ends_with_length(oai):
    reply = oai.chat.completions.create(model=MODEL, messages=ask("Tell me a long story."), temperature=0,
                                        max_tokens=3)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 3


def test_max_completion_tokens_is_honoured(oai):
    reply = oai.chat.completions.create(model=MODEL, messages=ask("Tell me a long story."), temperature=0,
                                        max_completion_tokens=2)
    assert reply.usage.completion_tokens == 2


def test_stop_string_cuts_the_text(oai):
    reply = oai.chat.completions.create(model=MODEL, messages=CAPITAL, temperature=0, stop=["Paris"])
    assert reply.choices[0].finish_reason == "stop"
    assert "Paris" not in reply.choices[0].message.content
    assert reply.choices[0].message.content.startswith("The capital of France is")


def test_stream_holds_back_a_partial_stop_string(oai):
    chunks = oai.chat.completions.create(model=MODEL, messages=CAPITAL, temperature=0, stop=["Paris."],
                                         stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text.startswith("The capital of France is") and "Par" not in text


def test_same_seed_same_sample(oai):
    def draw(seed):
        reply = oai.chat.completions.create(model=MODEL, messages=ask("Name an animal."), temperature=1.0,
                                            top_p=0.9, seed=seed, max_tokens=12)
        return reply.choices[0].message.content

    assert draw(7) == draw(7)
    assert len({draw(s) for s in range(4)}) > 1  # sampling really samples


def test_top_k_one_is_greedy(oai, http):
    greedy = oai.chat.completions.create(model=MODEL, messages=CAPITAL, temperature=0, max_tokens=12)
    top1 = http.post("/v1/chat/completions", json={"model": MODEL, "messages": CAPITAL, "temperature": 1.5,
                                                  "top_k": 1, "max_tokens": 12}).json()
    assert top1["choices"][0]["message"]["content"] == greedy.choices[0].message.content


def test_text_completion_stream_and_whole_agree(oai):
    whole = oai.completions.create(model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=8)
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 8
    parts = list(oai.completions.create(model=MODEL, prompt="The capital of France is", temperature=0,
                                        max_tokens=8, stream=True))
    assert "".join(p.choices[0].text for p in parts) == whole.choices[0].text
    assert "Paris" in whole.choices[0].text


def test_models_and_health(oai, http):
    base, *adapters = oai.models.list().data
    assert base.id == MODEL and base.parent is None
    assert all(m.parent == MODEL for m in adapters)  # adapters registered by other tests
    assert http.get("/health").json() == {"status": "ok"}


def test_ignore_eos_generates_max_tokens(http):
    body = {"model": MODEL, "messages": CAPITAL, "temperature": 0, "max_tokens": 30}
    natural = http.post("/v1/chat/completions", json=body).json()
    forced = http.post("/v1/chat/completions", json={**body, "ignore_eos": True}).json()
    assert natural["usage"]["completion_tokens"] < 30 and natural["choices"][0]["finish_reason"] == "stop"
    assert forced["usage"]["completion_tokens"] == 30 and forced["choices"][0]["finish_reason"] == "length"
