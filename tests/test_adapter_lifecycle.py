"""Adapter versions, aliases and traffic splits over HTTP: every registration is an immutable version that a
request may pin (`name@N`, `name@sha256:HEX`), an alias moves between versions atomically, a split keeps each
user on one version, old versions go past --keep-versions but never under a request, and every change is in
the adapter's audit log."""

import json
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import pytest

from conftest import CHAT, ask, running, scrape

ADAPTERS, ALIASES = "/v1/adapters", "/v1/aliases"
VERSION = "x-swapyard-version"
QUESTION = ask("Write a short poem about the sea.")
STREAM_TOKENS = 96  # a stream outlasts the registrations made while it runs (about 25 ms a token here)


def _register(http, name, folder, **extra):
    response = http.post(ADAPTERS, json={"name": name, "path": str(folder), **extra})
    assert response.status_code == 201, response.text
    return response.json()


def _ask(http, model, max_tokens=8, **extra):
    """(the version that answered, the answer)"""
    body = {"model": model, "messages": QUESTION, "temperature": 0, "max_tokens": max_tokens, **extra}
    response = http.post(CHAT, json=body)
    assert response.status_code == 200, response.text
    return response.headers[VERSION], response.json()["choices"][0]["message"]["content"]


def _hits(http) -> float:
    return scrape(http).get(("swapyard_prefix_cache_hits_total", ()), 0)


def _text_until_generating(lines) -> str:
    """A chat stream's text up to its first generated piece (its first chunk carries only the role)."""
    for line in lines:
        if line.startswith("data: {") and (text := json.loads(line[6:])["choices"][0]["delta"].get("content")):
            return text
    raise AssertionError("the stream ended before any text")


def _rest_of(lines) -> str:
    return "".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                   for line in lines if line.startswith("data: {") and json.loads(line[6:])["choices"])


def test_every_registration_is_a_version_a_request_can_pin(http, adapter_dirs):
    lora, lora2 = adapter_dirs["lora"], adapter_dirs["lora2"]
    first = _register(http, "pin", lora)
    _register(http, "pin", lora2, replace=True)
    third = _register(http, "pin", lora, replace=True)
    versions = http.get(f"{ADAPTERS}/pin/versions").json()["data"]
    assert [v["id"] for v in versions] == ["pin@1", "pin@2", "pin@3"]
    assert [v["current"] for v in versions] == [False, False, True]
    # The same files hash alike (and are stored once), whoever registers them.
    assert versions[0]["sha256"] == versions[2]["sha256"] == first["sha256"] == third["sha256"] != versions[1]["sha256"]
    one, two = _ask(http, "pin@1"), _ask(http, "pin@2")
    assert one[0] == "pin@1" and two[0] == "pin@2" and one[1] != two[1]
    assert _ask(http, "pin") == ("pin@3", one[1])  # the name serves its newest version
    assert _ask(http, f"pin@sha256:{first['sha256'][:12]}") == ("pin@3", one[1])  # the newest with that content
    assert _ask(http, "pin@002") == ("pin@2", two[1])
    for unknown in ("pin@4", "pin@0", "pin@", "pin@sha256:abc", "pin@sha256:" + "0" * 64, "pin@x", "nobody@1",
                    "pin@" + "1" * 200):
        refused = http.post(CHAT, json={"model": unknown, "messages": QUESTION, "max_tokens": 1})
        assert refused.status_code == 404 and refused.json()["error"]["code"] == "model_not_found", unknown
    too_long = http.post(CHAT, json={"model": "pin@" + "1" * 5000, "messages": QUESTION, "max_tokens": 1})
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "model"
    # Latency metrics are by the name asked for and the version that answered; a pin is named one way however
    # it was spelled (so spellings cannot multiply the series).
    metrics = scrape(http)
    assert metrics[("swapyard_requests_total", (("finish_reason", "length"), ("model", "pin@2"),
                                                ("version", "pin@2")))] == 2
    assert not [labels for _, labels in metrics if ("model", "pin@002") in labels or
                any(value.startswith("pin@sha256") for _, value in labels)]


def test_streams_finish_on_the_version_they_started_with_across_three_replaces(http, adapter_dirs):
    """Three streams on `flip`, each begun on a new version, then a fourth version: each ends as a cold request
    on its version's weights answers; a new version never finds an older one's cached prompt blocks."""
    contents = [adapter_dirs["lora"], adapter_dirs["lora2"]]
    for i, folder in enumerate(contents):
        _register(http, f"flip-cold{i}", folder)
    body = {"messages": QUESTION, "temperature": 0, "max_tokens": STREAM_TOKENS, "ignore_eos": True}
    cold = [http.post(CHAT, json={**body, "model": f"flip-cold{i}"}).json()["choices"][0]["message"]["content"]
            for i in range(2)]
    assert cold[0] != cold[1]
    with ExitStack() as stack:
        streams = []
        for version in range(1, 5):
            _register(http, "flip", contents[(version - 1) % 2], replace=version > 1)
            if version == 4:
                break
            response = stack.enter_context(http.stream("POST", CHAT, json={**body, "model": "flip", "stream": True}))
            lines = response.iter_lines()
            streams.append((response.headers[VERSION], _text_until_generating(lines), lines))
        running = scrape(http)
        # The first stream still ran when the last replace came.
        assert running[("swapyard_requests_running", (("model", "flip"), ("version", "flip@1")))] == 1
        texts = [(served, start + _rest_of(lines)) for served, start, lines in streams]
    assert [served for served, _ in texts] == ["flip@1", "flip@2", "flip@3"]
    assert [text for _, text in texts] == [cold[0], cold[1], cold[0]]
    before = _hits(http)
    assert _ask(http, "flip", STREAM_TOKENS, ignore_eos=True) == ("flip@4", cold[1])
    assert _hits(http) == before  # version 4's first request: no block of versions 1-3 (same prompt) served
    assert _ask(http, "flip", STREAM_TOKENS, ignore_eos=True) == ("flip@4", cold[1])
    assert _hits(http) > before  # its own blocks are (so the counter above could have moved)
    assert _ask(http, "flip@1", STREAM_TOKENS, ignore_eos=True) == ("flip@1", cold[0])


def test_an_alias_moves_atomically_under_load_and_rolls_back(http, oai, adapter_dirs):
    _register(http, "rel", adapter_dirs["lora"])
    _register(http, "rel", adapter_dirs["lora2"], replace=True)
    answers = dict(_ask(http, f"rel@{v}") for v in (1, 2))
    moved = http.put(f"{ALIASES}/rel-prod", json={"model": "rel@1"})
    assert moved.status_code == 200 and moved.json()["targets"] == [{"adapter": "rel", "version": 1, "weight": 1.0}]
    assert "rel-prod" in {m["id"] for m in http.get("/v1/models").json()["data"]}
    results, stop_at, moved_at = [], time.monotonic() + 4.0, []

    def load() -> None:
        while time.monotonic() < stop_at:
            start = time.monotonic()
            results.append((start, http.post(CHAT, json={"model": "rel-prod", "messages": QUESTION,
                                                         "temperature": 0, "max_tokens": 8})))

    with ThreadPoolExecutor(3) as pool:
        workers = [pool.submit(load) for _ in range(3)]
        time.sleep(1.5)
        assert http.put(f"{ALIASES}/rel-prod", json={"model": "rel@2"}).status_code == 200
        moved_at.append(time.monotonic())
        for worker in workers:
            worker.result()
    assert all(r.status_code == 200 for _, r in results), [r.text for _, r in results if r.status_code != 200]
    for _, response in results:  # each answer is its version's, whole
        assert response.json()["choices"][0]["message"]["content"] == answers[response.headers[VERSION]]
    after = [r.headers[VERSION] for start, r in results if start > moved_at[0]]
    before = [r.headers[VERSION] for start, r in results if start < moved_at[0] - 0.5]
    assert after and set(after) == {"rel@2"} and before and set(before) == {"rel@1"}
    # Rolling back is moving it back; the openai client names it like any model.
    assert http.put(f"{ALIASES}/rel-prod", json={"model": "rel@1"}).status_code == 200
    reply = oai.chat.completions.create(model="rel-prod", messages=QUESTION, temperature=0, max_tokens=8)
    assert reply.choices[0].message.content == answers["rel@1"] and reply.model == "rel-prod"
    events = http.get(f"{ADAPTERS}/rel/events").json()["data"]
    assert [(e["action"], e["version"]) for e in events] == [
        ("registered", 1), ("replaced", 2), ("alias_moved", None), ("alias_moved", None), ("alias_moved", None)]
    assert events[-1]["data"]["from"][0]["version"] == 2 and events[-1]["data"]["to"][0]["version"] == 1
    page = http.get(f"{ADAPTERS}/rel/events", params={"after": events[1]["id"], "limit": 2}).json()
    assert [e["id"] for e in page["data"]] == [e["id"] for e in events[2:4]] and page["has_more"]
    assert http.get(f"{ADAPTERS}/rel/events", params={"after": 2**40}).status_code == 400


def test_a_split_keeps_each_user_on_one_version_in_its_shares(http, adapter_dirs):
    """1,000 requests from 100 users over a 90/10 split: each user always gets one version, on every replica
    alike (the pick hashes alias and user); the shares come within 5 points of the weights."""
    _register(http, "spl", adapter_dirs["lora"])
    _register(http, "spl", adapter_dirs["lora2"], replace=True)
    split = {"targets": [{"model": "spl@1", "weight": 90}, {"model": "spl@2", "weight": 10}]}
    assert http.put(f"{ALIASES}/spl-canary", json=split).status_code == 200

    def served(i: int) -> tuple[str, str]:
        user = f"user-{i % 100}"
        # Half the users say who they are in the body, half in the header a gateway sets.
        extra = {"json": {"model": "spl-canary", "prompt": "Hi", "max_tokens": 1, "user": user}} if i % 2 else \
            {"json": {"model": "spl-canary", "prompt": "Hi", "max_tokens": 1}, "headers": {"X-Swapyard-User": user}}
        response = http.post("/v1/completions", **extra)
        assert response.status_code == 200, response.text
        return user, response.headers[VERSION]

    with ThreadPoolExecutor(8) as pool:
        picks = list(pool.map(served, range(1000)))
    by_user: dict[str, set[str]] = {}
    for user, version in picks:
        by_user.setdefault(user, set()).add(version)
    assert len(by_user) == 100 and all(len(versions) == 1 for versions in by_user.values())
    canary = sum(version == "spl@2" for _, version in picks)
    assert 50 <= canary <= 150, canary
    assert scrape(http)[("swapyard_requests_total", (("finish_reason", "length"), ("model", "spl-canary"),
                                                     ("version", "spl@2")))] == canary


def test_old_versions_are_pruned_past_the_limit_but_never_under_a_request(http, adapter_dirs):
    contents = [adapter_dirs["lora"], adapter_dirs["lora2"]]
    _register(http, "old", contents[0])
    body = {"model": "old@1", "messages": QUESTION, "temperature": 0, "max_tokens": 800, "ignore_eos": True,
            "stream": True}
    with http.stream("POST", CHAT, json=body) as response:
        lines = response.iter_lines()
        _text_until_generating(lines)
        for version in range(2, 7):  # the server keeps 5 (--keep-versions): version 1 would go, but runs
            _register(http, "old", contents[version % 2], replace=True)
        assert [v["version"] for v in http.get(f"{ADAPTERS}/old/versions").json()["data"]] == [1, 2, 3, 4, 5, 6]
        assert running(scrape(http), "old@1") == 1  # leaving the stream then ends it
    _register(http, "old", contents[1], replace=True)
    # Version 2, never asked for, goes; version 1 stays a minute after its request resolved it (a request may
    # still be between resolving its version and running on it).
    assert [v["version"] for v in http.get(f"{ADAPTERS}/old/versions").json()["data"]] == [1, 3, 4, 5, 6, 7]
    assert http.post(CHAT, json={**body, "model": "old@2", "stream": False}).status_code == 404
    events = http.get(f"{ADAPTERS}/old/events").json()["data"]
    assert [e["version"] for e in events if e["action"] == "pruned"] == [2]


@pytest.mark.parametrize("alias, body, status, param", [
    ("bad", {}, 400, "model"),
    ("bad", {"model": "alive", "targets": [{"model": "alive"}]}, 400, "model"),
    ("bad", {"model": "nobody"}, 404, "model"),
    ("bad", {"model": "alive@99"}, 404, "model"),
    ("bad", {"targets": [{"model": "alive"}, {"model": "alive@sha256:0123456789ab"}]}, 404, "targets[1].model"),
    ("bad", {"targets": []}, 400, "targets"),
    ("bad", {"targets": [{"model": "alive", "weight": 0}]}, 400, "targets.0.weight"),
    ("bad", {"targets": [{"model": "alive"}] * 9}, 400, "targets"),
    ("bad", {"model": "alive", "extra": 1}, 400, "extra"),
    ("bad", {"targets": [{"model": "alive-alias"}]}, 400, "targets[0].model"),  # versions, never aliases
    ("-bad", {"model": "alive"}, 400, "alias"),
    ("Alive", {"model": "alive"}, 409, "alias"),  # an adapter's name, ignoring case
    ("SMOLLM2-135M-INSTRUCT", {"model": "alive"}, 400, "alias"),
])
def test_bad_alias_requests_are_refused_naming_the_field(http, adapter_dirs, alias, body, status, param):
    if http.get(f"{ADAPTERS}/alive").status_code == 404:
        _register(http, "alive", adapter_dirs["lora"])
        assert http.put(f"{ALIASES}/alive-alias", json={"model": "alive"}).status_code == 200
    refused = http.put(f"{ALIASES}/{alias}", json=body)
    assert refused.status_code == status and refused.json()["error"]["param"] == param, refused.text
    assert http.get(f"{ALIASES}/{alias}").status_code == 404


def test_names_and_aliases_never_overlap_and_an_aliased_adapter_stays(http, adapter_dirs):
    _register(http, "kept", adapter_dirs["lora"])
    assert http.put(f"{ALIASES}/kept-prod", json={"model": "kept"}).status_code == 200
    taken = http.post(ADAPTERS, json={"name": "KEPT-prod", "path": str(adapter_dirs["lora"])})
    assert taken.status_code == 409 and "alias" in taken.json()["error"]["message"]
    refused = http.delete(f"{ADAPTERS}/kept")
    assert refused.status_code == 409 and "kept-prod" in refused.json()["error"]["message"]
    assert _ask(http, "kept-prod")[0] == "kept@1"
    assert http.delete(f"{ALIASES}/kept-prod").status_code == 200
    assert http.delete(f"{ALIASES}/kept-prod").status_code == 404
    assert http.post(CHAT, json={"model": "kept-prod", "messages": QUESTION}).status_code == 404
    assert http.delete(f"{ADAPTERS}/kept").status_code == 200
    # Version numbers are never reused: a name registered again goes on from its last one.
    assert _register(http, "kept", adapter_dirs["lora"])["version"] == 2
    assert [e["action"] for e in http.get(f"{ADAPTERS}/kept/events").json()["data"]] == [
        "registered", "alias_moved", "alias_deleted", "deleted", "registered"]
    long_user = http.post(CHAT, json={"model": "kept", "messages": QUESTION, "user": "u" * 257})
    assert long_user.status_code == 400 and long_user.json()["error"]["param"] == "user"
