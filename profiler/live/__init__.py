"""Live runs: replay a Workload on a real vLLM server and record it in the simulator's schema.

Modules: server (start/stop a vLLM OpenAI server on 127.0.0.1), client (asyncio
streaming replay), metrics (/metrics scraping), iteration_log (per-step log
lines), tables (RunResult schema), machine (machine state), bench_import
(`vllm bench serve` result files), runner (ties them together). CLI:
``python -m profiler.live``.
"""
