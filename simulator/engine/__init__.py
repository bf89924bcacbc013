"""One vLLM V1 replica: the SimPy loop (loop.py), the scheduler interface (interface.py) and its
implementations (native.py, steady.py fast path, vllm_oracle.py), the rules they share (rules.py),
the KV cache and the tabulation of a run into a RunResult."""
