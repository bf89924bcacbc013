"""Client faults a real vLLM cannot produce: malformed stream chunks, a refused connection.

A tiny streaming server on 127.0.0.1 speaks just enough of the OpenAI API
(/health, /v1/models, /metrics, streaming /v1/completions) and slips broken
chunks between good ones.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from profiler.live.runner import EXIT_OK, LiveRunConfig, run_live
from profiler.live.server import ServerError, free_port
from simulator.records.engine_config import EngineConfig
from simulator.records.workload import Workload

BROKEN = [
    b'data: {"choices": [{"text": "x", "token_ids": [1',  # truncated JSON
    b"data: \xff\xfe not utf-8",
    b'data: ["a list, not an object"]',
    b'data: {"choices": ["not an object"]}',
]


class FakeVllm(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # the body ends when the connection closes

    def log_message(self, *args):  # keep test output quiet
        pass

    def _send(self, code: int, body: bytes, kind: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/health":
            self._send(200, b"")
        elif self.path == "/v1/models":
            self._send(200, json.dumps({"data": [{"id": "fake"}]}).encode())
        elif self.path == "/metrics":
            text = ('vllm:num_requests_running{engine="0"} 0\nvllm:num_requests_waiting{engine="0"} 0\n'
                    'vllm:kv_cache_usage_perc{engine="0"} 0\nvllm:num_preemptions_total{engine="0"} 0\n'
                    'vllm:cache_config_info{block_size="32",num_gpu_blocks="64"} 1.0\n')
            self._send(200, text.encode(), "text/plain")
        else:
            self._send(404, b"{}")

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if not body.get("stream"):
            self._send(200, json.dumps({"choices": [{"text": "ok"}]}).encode())
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        n = int(body["max_tokens"])
        for i in range(n):
            finish = "length" if i == n - 1 else None
            chunk = {"choices": [{"text": "t", "token_ids": [7], "finish_reason": finish}]}
            self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            if i < len(BROKEN):
                self.wfile.write(BROKEN[i] + b"\n\n")
            self.wfile.flush()
        usage = {"choices": [], "usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": n}}
        self.wfile.write(b"data: " + json.dumps(usage).encode() + b"\n\ndata: [DONE]\n\n")


@pytest.fixture
def fake_server():
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), FakeVllm)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _workload(n=4, out=6):
    return Workload(np.linspace(0, 0.2, n), np.full(n, 20), np.full(n, out), np.zeros(n, int),
                    np.full(n, "chat", object))


ENGINE = EngineConfig(block_size=32, max_model_len=1024, num_gpu_blocks_override=64)


def test_malformed_chunks_are_counted_and_skipped(fake_server, tmp_path):
    config = LiveRunConfig(request_timeout_s=10, warmup_requests=1, lead_s=0.1, settle_s=0.1)
    outcome = run_live(_workload(), tmp_path, url=fake_server, engine=ENGINE, config=config, progress=False)
    req = outcome.result.requests
    assert outcome.exit_code == EXIT_OK
    assert req["status"].tolist() == ["completed"] * 4
    assert req["output_tokens"].tolist() == [6] * 4
    assert req["malformed_chunks"].tolist() == [len(BROKEN)] * 4
    assert outcome.result.summary["live"]["malformed_chunks"] == 4 * len(BROKEN)
    # attached without a server log: the timeline comes from the /metrics samples
    assert outcome.result.summary["live"]["timeline_source"].startswith("/metrics")
    assert len(outcome.result.timeline["time_s"]) >= 2
    assert (tmp_path / "requests.parquet").exists() and (tmp_path / "tokens.parquet").exists()


def test_a_server_that_is_not_there_fails_requests_with_a_reason(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    config = LiveRunConfig(request_timeout_s=5, warmup_requests=0, lead_s=0.1, settle_s=0.1)
    with pytest.raises(ServerError, match="no vLLM server answers"):
        # nothing answers /v1/models: the run cannot even begin
        run_live(_workload(), tmp_path, url=url, engine=ENGINE, config=config, progress=False)


def test_attaching_to_a_non_loopback_url_is_refused(tmp_path):
    from simulator.records.errors import ConfigError

    with pytest.raises(ConfigError, match="loopback"):
        run_live(_workload(), tmp_path, url="http://10.0.0.1:8000", engine=ENGINE, progress=False)


