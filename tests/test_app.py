"""web/app.py in-process (Flask's test client, gevent without monkey-patching): the model cache,
loading, failures inside a step, and torch's thread state. The wire contract itself is tested
against real gunicorn in test_serving.py."""

from __future__ import annotations

import json
import os
from dataclasses import asdict

import gevent
import pytest
import torch

import web.registry
from model.checkpoint import checkpoint_path, load_checkpoint, model_from_checkpoint
from model.engine import Engine, SamplingParams, generate
from model.gpt import GPTConfig
from model.prompt import chat_turns, prompt_tokens
from conftest import REPO_ROOT
from serving import figures, metric_samples, write_model
from web.app import ServerConfig, create_app

SMALL = GPTConfig(block_size=128, n_layer=2, n_head=2, n_embd=32)
HI = [{"role": "user", "content": "Say hi."}]


def make_client(models_dir, **config):
    return create_app(ServerConfig(models_dir=str(models_dir), **config)).test_client()


def chat(client, model: str, **kw) -> tuple[int, dict]:
    response = client.post("/v1/chat/completions", json={"model": model, "messages": HI, "temperature": 0, "max_tokens": 12} | kw)
    return response.status_code, response.get_json()


def sse_data(body: bytes) -> list:
    return [line[6:] for line in body.decode().split("\n") if line.startswith("data: ")]


def test_config_from_env():
    config = ServerConfig.from_env(
        {"NANOGPT_MODELS_DIR": "runs", "NANOGPT_API_KEYS": " a , b,,", "NANOGPT_MAX_ROWS": "4", "NANOGPT_KEEPALIVE": "0.5"}
    )
    assert (config.models_dir, config.api_keys, config.max_rows, config.keepalive) == ("runs", ("a", "b"), 4, 0.5)
    assert ServerConfig.from_env({}) == ServerConfig()


def test_int8_weights_serve_what_the_int8_model_generates(tmp_path, caplog):
    write_model(tmp_path, "run", SMALL)
    assert ServerConfig.from_env({"NANOGPT_QUANT": "int8"}).quant == "int8"
    with caplog.at_level("INFO", logger="gunicorn.error"):
        client = make_client(tmp_path, quant="int8")
    assert "int8 weights (NANOGPT_QUANT), " in caplog.text  # and whether torch's kernel runs here
    model = model_from_checkpoint(load_checkpoint(checkpoint_path(tmp_path / "run", 1))).eval()
    assert model.prepare_inference("int8").startswith("int8")
    expected = "".join(generate(model, prompt_tokens(chat_turns(HI)), SamplingParams(temperature=0, max_tokens=12)))
    status, body = chat(client, "run")
    assert status == 200 and body["choices"][0]["message"]["content"] == expected
    (scheduler,) = client.application.extensions["nanogpt_registry"].loaded.values()
    served = scheduler.loaded.get()
    assert served.lm_head.int8 is not None and served.lm_head.weight is None


def test_a_quant_the_server_cannot_serve_stops_it_at_start(tmp_path):
    with pytest.raises(ValueError, match="NANOGPT_QUANT='int4': expected one of none, int8"):
        make_client(tmp_path, quant="int4")
    with pytest.raises(ValueError, match="NANOGPT_QUANT=int8 is for decoding on CPU"):
        make_client(tmp_path, quant="int8", device="cuda")
    with pytest.raises(ValueError, match="NANOGPT_MAX_ROWS=33 with NANOGPT_QUANT=int8: at most 32"):
        make_client(tmp_path, quant="int8", max_rows=33)


def test_a_new_checkpoint_is_served_on_the_next_request(tmp_path):
    write_model(tmp_path, "run", SMALL, seed=0, step=1)
    client = make_client(tmp_path)
    status, first = chat(client, "run")
    assert status == 200
    write_model(tmp_path, "run", SMALL, seed=1, step=2)
    status, second = chat(client, "run")
    model = model_from_checkpoint(load_checkpoint(checkpoint_path(tmp_path / "run", 2))).eval()
    expected = "".join(generate(model, prompt_tokens(chat_turns(HI)), SamplingParams(temperature=0, max_tokens=12)))
    assert second["choices"][0]["message"]["content"] == expected != first["choices"][0]["message"]["content"]
    assert client.get("/health").get_json() == {"status": "ok", "models": {"run": {"state": "ready"}}}
    loads = [s for s in metric_samples(client.get("/metrics").get_data(as_text=True)) if s.name == "nanogpt_model_loads_total"]
    assert [(s.labels, s.value) for s in loads] == [({"model": "run", "outcome": "ok"}, 2.0)]


def test_a_checkpoint_holding_code_is_refused_and_others_still_serve(tmp_path):
    write_model(tmp_path, "good", SMALL)
    bad = write_model(tmp_path, "bad", SMALL)
    path = checkpoint_path(tmp_path / "bad", 1)
    torch.save({"model": bad.state_dict(), "config": SMALL, "step": 1}, path)  # a pickled dataclass
    client = make_client(tmp_path)
    status, body = chat(client, "bad")
    assert status == 500 and body["error"]["type"] == "server_error"
    assert str(path) in body["error"]["message"] and "plain data" in body["error"]["message"]
    assert chat(client, "good")[0] == 200
    assert client.get("/health").get_json()["models"]["bad"]["state"] == "failed"


def test_concurrent_requests_for_one_model_load_it_once(tmp_path, monkeypatch):
    write_model(tmp_path, "run", SMALL)
    loads = []
    real = web.registry.load_for_serving
    monkeypatch.setattr(web.registry, "load_for_serving", lambda *a: loads.append(a) or real(*a))
    client = make_client(tmp_path)
    jobs = [gevent.spawn(chat, client, "run") for _ in range(3)]
    gevent.joinall(jobs, raise_error=True)
    assert [job.value[0] for job in jobs] == [200, 200, 200] and len(loads) == 1


def test_model_cache_is_bounded_and_never_evicts_a_busy_model(tmp_path):
    for name, seed in [("a", 0), ("b", 1)]:
        write_model(tmp_path, name, SMALL, seed=seed)
    client = make_client(tmp_path, max_models=1)
    assert chat(client, "a")[0] == 200
    assert chat(client, "b")[0] == 200  # a was idle: evicted
    assert list(client.get("/health").get_json()["models"]) == ["b"]
    stream = client.post("/v1/chat/completions", json={"model": "b", "messages": HI, "stream": True, "max_tokens": 100})
    chunks = stream.response  # a generator: the request stays open until closed
    next(chunks)
    status, body = chat(client, "a")
    assert status == 503 and body["error"]["code"] == "overloaded"
    stream.close()  # what a disconnect does: the request is cancelled
    assert chat(client, "a")[0] == 200


def test_a_failed_decode_step_ends_its_requests_and_the_next_is_served(tmp_path, monkeypatch):
    write_model(tmp_path, "run", SMALL)
    client = make_client(tmp_path)
    calls = {"n": 0}
    real = Engine.decode_step

    def failing_decode_step(self):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated failure")
        return real(self)

    monkeypatch.setattr(Engine, "decode_step", failing_decode_step)
    body = {"model": "run", "messages": HI, "stream": True, "max_tokens": 20}
    events = sse_data(client.post("/v1/chat/completions", json=body).get_data())
    assert json.loads(events[-1])["error"]["message"] == "Generation failed: RuntimeError: simulated failure"
    assert "[DONE]" not in events
    status, reply = chat(client, "run")
    assert status == 200 and reply["usage"]["completion_tokens"] == 12
    assert figures(client.get("/metrics").get_data(as_text=True), "run")["finished"]["error"] == 1


def test_torch_state_of_the_serving_thread_is_untouched(tmp_path):
    write_model(tmp_path, "run", SMALL)
    client = make_client(tmp_path)
    assert chat(client, "run")[0] == 200
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


def test_models_dir_listing(tmp_path):
    write_model(tmp_path, "b-run", SMALL)
    write_model(tmp_path, "a-run", SMALL)
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("not a run")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "step_000001.pt").write_bytes(b"truncated")
    client = make_client(tmp_path)
    assert [m["id"] for m in client.get("/v1/models").get_json()["data"]] == ["a-run", "b-run"]
    assert make_client(tmp_path / "missing").get("/v1/models").get_json() == {"object": "list", "data": []}


def test_model_config_is_plain_data(tmp_path):
    """The checkpoint the server reads stores the config as a dict (weights_only-safe)."""
    write_model(tmp_path, "run", SMALL)
    assert load_checkpoint(checkpoint_path(tmp_path / "run", 1))["config"] == asdict(SMALL)


@pytest.mark.parametrize("page", ["/", "/static/chat.js", "/static/chat.css"])
def test_chat_page_is_served(tmp_path, page):
    response = make_client(tmp_path).get(page)
    assert response.status_code == 200 and response.data


def test_workers_keep_one_slot_each_and_a_replacement_takes_the_dead_ones(monkeypatch, tmp_path):
    import runpy
    from types import SimpleNamespace

    for name in ("OMP_NUM_THREADS", "TORCHINDUCTOR_COMPILE_THREADS", "NANOGPT_WORKER_SLOT"):
        monkeypatch.setenv(name, "1")  # the config file sets defaults in os.environ; restored after the test
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))  # else it would make one and set it here
    hooks = runpy.run_path(str(REPO_ROOT / "gunicorn_config.py"))
    server = SimpleNamespace(WORKERS={})

    def spawn(pid: int) -> int:  # what gunicorn's Arbiter.spawn_worker does around the fork
        worker = SimpleNamespace()
        hooks["pre_fork"](server, worker)
        server.WORKERS[pid] = worker
        hooks["post_fork"](server, worker)  # (in the child)
        return int(os.environ["NANOGPT_WORKER_SLOT"])

    assert [spawn(pid) for pid in (101, 102, 103, 104)] == [0, 1, 2, 3]
    del server.WORKERS[103]  # slot 2 dies
    assert spawn(105) == 2
    del server.WORKERS[101], server.WORKERS[102]
    assert [spawn(106), spawn(107)] == [0, 1]


def test_default_device_puts_worker_slots_on_distinct_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert web.registry.default_device(3) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert [web.registry.default_device(slot) for slot in range(6)] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3", "cuda:0", "cuda:1"]


def test_create_app_passes_the_worker_slot_to_the_registry(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOGPT_WORKER_SLOT", "3")
    app = create_app(ServerConfig(models_dir=str(tmp_path)))
    assert app.extensions["nanogpt_registry"].gpu_slot == 3


def test_health_names_no_file_and_metrics_need_the_key(tmp_path):
    write_model(tmp_path, "run", SMALL)
    client = make_client(tmp_path, api_keys=("sk-1",))
    key = {"Authorization": "Bearer sk-1"}
    assert client.post("/v1/chat/completions", json={"model": "run", "messages": HI, "max_tokens": 2}, headers=key).status_code == 200
    health = client.get("/health")
    assert health.status_code == 200 and str(tmp_path) not in health.get_data(as_text=True)
    assert health.get_json() == {"status": "ok", "models": {"run": {"state": "ready"}}}
    assert client.get("/metrics").status_code == 401
    metrics = client.get("/metrics", headers=key)
    assert metrics.status_code == 200 and metrics.content_type.startswith("text/plain")
    assert figures(metrics.get_data(as_text=True), "run")["finished"]["length"] == 1
    assert str(tmp_path) not in metrics.get_data(as_text=True)
    # a scraper on a private network, by the operator's choice
    assert make_client(tmp_path, api_keys=("sk-1",), metrics_public=True).get("/metrics").status_code == 200
    # metrics off (to measure what they cost): nothing served
    assert make_client(tmp_path, metrics=False).get("/metrics").status_code == 404


def test_metrics_label_routes_not_paths(tmp_path):
    client = make_client(tmp_path)
    for path in ("/v1/a", "/v1/b", "/nothing/here"):
        assert client.get(path).status_code == 404
    assert client.post("/v1/chat/completions", json={"model": "ghost", "messages": HI}).status_code == 404
    samples = [s for s in metric_samples(client.get("/metrics").get_data(as_text=True))
               if s.name == "nanogpt_http_requests_total"]
    counts = {(s.labels["endpoint"], s.labels["model"], s.labels["status"]): s.value for s in samples}
    # a made-up path or model is no new series: an unknown model is "", any unmatched URL "unmatched"
    assert counts == {("unmatched", "", "404"): 3.0, ("/v1/chat/completions", "", "404"): 1.0}


def test_models_say_which_stage_wrote_them_and_the_log_names_the_folder(tmp_path, caplog):
    from model.checkpoint import model_state, save_checkpoint
    from model.gpt import GPT

    for name, kind in [("base", "pretrain"), ("tuned", "sft")]:
        save_checkpoint(model_state(GPT(SMALL)) | {"step": 1, "kind": kind}, checkpoint_path(tmp_path / name, 1))
    write_model(tmp_path, "old", SMALL)  # a checkpoint that does not say
    with caplog.at_level("INFO", logger="gunicorn.error"):
        client = make_client(tmp_path)
    assert f"models directory {tmp_path.resolve()} (NANOGPT_MODELS_DIR): base (pretrain), old (unknown stage), tuned (sft)" \
        in caplog.text
    listed = {m["id"]: m["kind"] for m in client.get("/v1/models").get_json()["data"]}
    assert listed == {"base": "pretrain", "old": None, "tuned": "sft"}
    assert client.get("/v1/models/tuned").get_json()["kind"] == "sft"
    with caplog.at_level("INFO", logger="gunicorn.error"):
        make_client(tmp_path / "nowhere")
    assert f"models directory {(tmp_path / 'nowhere').resolve()} (NANOGPT_MODELS_DIR) does not exist" in caplog.text
