"""Per-model Prometheus metrics move with each request."""

import json
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from conftest import MODEL, ask, scrape

LABEL = (("model", MODEL), ("version", ""))  # the base model: no adapter version


def test_metrics_move_after_a_request(oai, http):
    before = scrape(http)
    reply = oai.chat.completions.create(model=MODEL, messages=ask("Say hi."), temperature=0, max_tokens=5)
    after = scrape(http)

    def moved(name, labels=LABEL):
        return after[(name, labels)] - before.get((name, labels), 0.0)

    assert moved("swapyard_generation_tokens_total") == reply.usage.completion_tokens
    assert moved("swapyard_prompt_tokens_total") == reply.usage.prompt_tokens
    for histogram in ("time_to_first_token", "e2e_request_latency", "request_queue_time"):
        assert moved(f"swapyard_{histogram}_seconds_count") == 1
    assert moved("swapyard_inter_token_latency_seconds_count") == reply.usage.completion_tokens - 1
    finish = (("finish_reason", reply.choices[0].finish_reason), ("model", MODEL), ("version", ""))
    assert moved("swapyard_requests_total", finish) == 1
    assert after[("swapyard_requests_running", LABEL)] == 0
    assert after[("swapyard_requests_waiting", LABEL)] == 0


def test_exposition_passes_promtool_lint_rules(http, oai):
    """What `promtool check metrics` enforces, on our /metrics: one HELP and TYPE per family, counters
    ending in _total, names and units in Prometheus' conventions, histograms whose buckets add up."""
    oai.chat.completions.create(model=MODEL, messages=ask("Say hi."), max_tokens=3)
    text = http.get("/metrics").text
    helps, types = {}, {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, doc = line[7:].partition(" ")
            assert name not in helps and doc.strip(), f"{name}: duplicate or empty HELP"
            helps[name] = doc
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert name not in types, f"{name}: duplicate TYPE"
            types[name] = kind
    assert helps.keys() == types.keys()
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("swapyard_"):
            continue  # vLLM's and the Python client's own families are theirs to keep
        assert re.fullmatch(r"[a-z_][a-z0-9_]*", family.name), family.name
        assert not family.name.endswith("_total") or family.type == "counter", family.name  # the parser strips it
        if family.type == "counter":
            assert f"{family.name}_total" in types or family.name in types
        if family.type == "histogram":
            assert family.name.endswith(("_seconds", "_size")), f"{family.name}: histogram without a unit"
            by_series: dict[tuple, list] = {}
            for sample in family.samples:
                labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
                by_series.setdefault(labels, []).append(sample)
            for samples in by_series.values():
                buckets = [s.value for s in samples if s.name.endswith("_bucket")]
                count = next(s.value for s in samples if s.name.endswith("_count"))
                assert buckets == sorted(buckets) and buckets[-1] == count


def test_grafana_dashboard_only_queries_exported_metrics(http, oai):
    oai.chat.completions.create(model=MODEL, messages=ask("Say hi."), max_tokens=3)
    exported = {family.name for family in text_string_to_metric_families(http.get("/metrics").text)}
    dashboard = json.loads((Path(__file__).parents[1] / "deploy/compose/grafana/dashboards/swapyard.json").read_text())
    queried = {re.sub(r"_(bucket|total)$", "", name) for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"swapyard_\w+", target["expr"])}
    assert len(queried) >= 10 and queried <= exported, queried - exported
