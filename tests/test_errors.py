"""Bad input gets an OpenAI-style error body with a 4xx status, never a 500."""

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
    (CHAT, _chat(n=2), 400, "n"),
    (CHAT, _chat(seed=2**70), 400, "seed"),  # found by the fuzz test: a 500 from the generator before
    (CHAT, _chat(top_k=2**70, temperature=1), 400, "top_k"),
    (CHAT, _chat(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    (CHAT, _chat(messages=ask("word " * MAX_MODEL_LEN)), 400, "messages"),
    ("/v1/completions", {"model": MODEL, "prompt": [10**9]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, "prompt"),
])
def test_bad_request_is_a_clear_4xx(http, path, body, status, param):
    response = http.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] in {"invalid_request_error", "not_found_error"}
    if param is not None:
        assert error["param"] is not None and error["param"].startswith(param)


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
