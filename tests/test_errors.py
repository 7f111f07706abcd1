"""Bad input gets an OpenAI-style error body with a 4xx status, never a 500."""

import json

import pytest

from conftest import MAX_MODEL_LEN, MODEL, ask

CHAT = "/v1/chat/completions"


def _chat(**fields):
    return {"model": MODEL, "messages": ask("Hi"), **fields}


@pytest.mark.parametrize("path, body, status, param", [
    (CHAT, _chat(model="no-such-model"), 404, "model"),
    ("/v1/completions", {"model": "no-such-model", "prompt": "x"}, 404, "model"),
    (CHAT, _chat(messages=[]), 400, "messages"),
    (CHAT, {"model": MODEL}, 400, "messages"),
    (CHAT, _chat(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages.0.role"),
    (CHAT, _chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]), 400, None),
    (CHAT, _chat(max_tokens=0), 400, "max_tokens"),
    (CHAT, _chat(max_tokens=-5), 400, "max_tokens"),
    (CHAT, _chat(max_tokens=MAX_MODEL_LEN), 400, "max_tokens"),
    (CHAT, _chat(temperature=3), 400, "temperature"),
    (CHAT, _chat(n=0), 400, "n"),
    (CHAT, _chat(n=17), 400, "n"),
    ("/v1/completions", {"model": MODEL, "prompt": ["a"] * 9, "n": 8}, 400, "n"),
    (CHAT, _chat(seed=2**70), 400, "seed"),  # found by the fuzz test: a 500 from the generator before
    (CHAT, _chat(top_k=2**70, temperature=1), 400, "top_k"),
    (CHAT, _chat(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    (CHAT, _chat(messages=ask("word " * MAX_MODEL_LEN)), 400, "messages"),
    ("/v1/completions", {"model": MODEL, "prompt": [10**9]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, "prompt"),
    # Prompts of no tokens: never prefilled nor decoded, they once held their sequence slots forever.
    ("/v1/completions", {"model": MODEL, "prompt": [""]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [[]]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": ["fine", ""], "n": 8}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [""], "n": 16, "stream": True}, 400, "prompt"),
    # Text that no tokenizer can encode: a lone surrogate parses from JSON.
    (CHAT, _chat(messages=ask("hi \ud800")), 400, "messages.0.content"),
    (CHAT, _chat(messages=[{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]), 400, "messages"),
    ("/v1/completions", {"model": MODEL, "prompt": "\ud800"}, 400, "prompt"),
    (CHAT, _chat(stop="\ud800"), 400, "stop"),
    (CHAT, _chat(stop=["x" * 257]), 400, "stop"),
    (CHAT, _chat(cache_salt=""), 400, "cache_salt"),
    (CHAT, _chat(cache_salt="tenant/1"), 400, "cache_salt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "cache_salt": "s" * 129}, 400, "cache_salt"),
    # Not implemented yet: refused by name rather than silently ignored.
    (CHAT, _chat(functions=[{"name": "f"}]), 400, "functions"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),  # needs echo
    # Sampling controls out of range, or naming tokens the vocabulary does not have.
    (CHAT, _chat(logit_bias={"x": 1}), 400, "logit_bias"),
    (CHAT, _chat(logit_bias={"42": 101}), 400, "logit_bias"),
    (CHAT, _chat(logit_bias={str(10**7): 1}), 400, "logit_bias"),
    (CHAT, _chat(logit_bias={"05": 1}), 400, "logit_bias"),  # once read as token 5
    (CHAT, _chat(logit_bias={"+5": 1}), 400, "logit_bias"),
    (CHAT, _chat(logit_bias={" 5": 1}), 400, "logit_bias"),
    (CHAT, _chat(logit_bias={"5.0": 1}), 400, "logit_bias"),
    (CHAT, _chat(top_logprobs=3), 400, "top_logprobs"),  # needs logprobs: true, as OpenAI says
    (CHAT, _chat(logprobs=True, top_logprobs=21), 400, "top_logprobs"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 21}, 400, "logprobs"),
    (CHAT, _chat(presence_penalty=2.5), 400, "presence_penalty"),
    (CHAT, _chat(frequency_penalty=-3), 400, "frequency_penalty"),
    (CHAT, _chat(repetition_penalty=0), 400, "repetition_penalty"),
    (CHAT, _chat(min_p=1.5), 400, "min_p"),
    (CHAT, _chat(stop_token_ids=[10**7]), 400, "stop_token_ids"),
    (CHAT, _chat(min_tokens=10, max_tokens=5), 400, "min_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "suffix": "y"}, 400, "suffix"),
])
def test_bad_request_is_a_clear_4xx(http, path, body, status, param):
    # json.dumps escapes what UTF-8 cannot carry (lone surrogates), as a JSON client may send it.
    response = http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] in {"invalid_request_error", "not_found_error"}
    if param is not None:
        assert error["param"] is not None and error["param"].startswith(param)


def test_fields_sent_with_their_off_value_are_accepted(http):
    off = {"response_format": {"type": "text"}, "tools": [], "tool_choice": "none", "logit_bias": {},
           "presence_penalty": 0, "frequency_penalty": 0, "logprobs": False, "top_logprobs": 0, "max_tokens": 2}
    assert http.post(CHAT, json=_chat(**off)).status_code == 200


def test_context_errors_name_the_limit(http):
    too_long = http.post(CHAT, json=_chat(messages=ask("word " * MAX_MODEL_LEN))).json()["error"]
    assert f"maximum context length is {MAX_MODEL_LEN} tokens" in too_long["message"]
    assert too_long["code"] == "context_length_exceeded"
    over = http.post(CHAT, json=_chat(max_tokens=MAX_MODEL_LEN)).json()["error"]
    assert f"maximum context length is {MAX_MODEL_LEN} tokens" in over["message"]


def test_unknown_model_says_which(http):
    error = http.post(CHAT, json=_chat(model="ghost")).json()["error"]
    assert "ghost" in error["message"] and error["code"] == "model_not_found"


def test_malformed_json_body(http):
    response = http.post(CHAT, content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_unknown_route_is_a_json_404(http):
    response = http.get("/v1/nothing-here")
    assert response.status_code == 404 and "error" in response.json()
