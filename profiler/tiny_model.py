"""A tiny random-weight Llama and its tokenizer, built locally with no model hub.

`ensure_tiny_model()` returns the cached folder (building it on first use);
vLLM loads it like any Hugging Face model folder. Another shape
(``ensure_tiny_model(shape={"layers": 6, "hidden": 768, ...})``, keys in ``SHAPE_KEYS``)
is another model: its own name (``tiny_model_name``), folder and recipe hash. The build is deterministic:
fixed seed, a byte-level BPE tokenizer trained on a fixed list of Python
standard-library modules, so two builds on the same Python give identical files.

Needs torch, transformers and tokenizers (the engine env has them).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import shutil
import sysconfig
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL_NAME = "tiny-llama"
#: bump when the recipe changes, so cached folders are rebuilt
RECIPE_VERSION = 1
SEED = 0

TINY_LLAMA_CONFIG = {
    "num_hidden_layers": 4,
    "hidden_size": 512,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "intermediate_size": 1536,
    "vocab_size": 8192,
    "max_position_embeddings": 32768,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
}

#: shape settings (model.<key>=... on the command line) -> Hugging Face config keys
SHAPE_KEYS = {"layers": "num_hidden_layers", "hidden": "hidden_size", "heads": "num_attention_heads",
              "kv_heads": "num_key_value_heads", "intermediate": "intermediate_size", "vocab": "vocab_size",
              "max_position": "max_position_embeddings"}

#: standard-library modules the tokenizer is trained on (present in every CPython 3.11)
CORPUS_MODULES = (
    "argparse.py", "collections/__init__.py", "csv.py", "dataclasses.py", "datetime.py",
    "difflib.py", "email/message.py", "functools.py", "heapq.py", "inspect.py", "json/decoder.py",
    "logging/__init__.py", "pathlib.py", "random.py", "statistics.py", "string.py", "textwrap.py",
    "typing.py", "unittest/case.py", "urllib/parse.py",
)

SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<think>", "</think>")

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@functools.cache
def weight_dtype() -> str:
    """The tiny model's weight dtype on this machine: ``bfloat16``, as the models it stands in for
    ship, except on an x86 CPU without AVX-512 and no GPU. There vLLM's CPU build loads its AVX2
    kernels, cannot build oneDNN linear layers for bf16 ("Failed to create oneDNN linear") and
    falls back to torch's linear, 2-6x slower; in ``float32`` the layers run through oneDNN (with
    its per-shape set-up, as on AVX-512 hosts in bf16). The choice follows vLLM's own
    (vllm/platforms/cpu.py, ``import_kernels``: ``torch.cpu._is_avx512_supported()``)."""
    import platform

    try:
        import torch
    except ImportError:  # no engine here: the folder is built (and checked) where torch is
        return "bfloat16"
    if torch.cuda.is_available() or platform.machine().lower() not in ("x86_64", "amd64"):
        return "bfloat16"
    avx512 = getattr(torch.cpu, "_is_avx512_supported", None)
    return "bfloat16" if avx512 is None or avx512() else "float32"


def engine_dtype(model: str | Path) -> str | None:
    """The ``--dtype`` to serve a tiny model folder with: the dtype it was built in where that is not
    bf16 (vLLM's ``auto`` casts a float32 checkpoint to bf16 on CPUs, which is what the float32 build
    avoids), else None (``auto``). None for any other model."""
    try:
        dtype = json.loads((Path(model) / "rllm_sim_model.json").read_text()).get("dtype")
    except (ValueError, OSError):  # no marker: not a tiny model folder
        return None
    return None if dtype in (None, "bfloat16") else dtype


def default_cache_dir() -> Path:
    """Where built models live: $RLLM_SIM_CACHE_DIR/models, else <repo>/.cache/models."""
    root = os.environ.get("RLLM_SIM_CACHE_DIR")
    return (Path(root) if root else REPO_ROOT / ".cache") / "models"


def check_shape(shape: dict | None) -> dict[str, int]:
    """The shape settings, validated (ConfigError naming model.<key>)."""
    from simulator.records.errors import ConfigError

    shape = dict(shape or {})
    for key, value in shape.items():
        if key not in SHAPE_KEYS:
            raise ConfigError(f"model.{key}", f"unknown shape setting; allowed: {', '.join(SHAPE_KEYS)}")
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"model.{key}", f"must be an integer >= 1, got {value!r}")
    config = model_config(shape, checked=True)
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    if config["hidden_size"] % heads or (config["hidden_size"] // heads) % 2:
        raise ConfigError("model.heads", f"must divide model.hidden ({config['hidden_size']}) into an even head "
                          f"size, got {heads}")
    if heads % kv_heads:
        raise ConfigError("model.kv_heads", f"must divide model.heads ({heads}), got {kv_heads}")
    if config["vocab_size"] < 512:
        raise ConfigError("model.vocab", f"must be >= 512 (the tokenizer's bytes and merges), "
                          f"got {config['vocab_size']}")
    return shape


def model_config(shape: dict | None = None, checked: bool = False) -> dict:
    """The Hugging Face config of the tiny model of this shape (intermediate: 3 x hidden unless given)."""
    shape = dict(shape or {}) if checked else check_shape(shape)
    config = dict(TINY_LLAMA_CONFIG)
    if "hidden" in shape and "intermediate" not in shape:
        config["intermediate_size"] = 3 * shape["hidden"]
    config.update({SHAPE_KEYS[k]: v for k, v in shape.items()})
    return config


def tiny_model_name(shape: dict | None = None) -> str:
    """'tiny-llama' for the default shape, else e.g. 'tiny-llama-layers6-hidden768-heads12-kv_heads4'."""
    config = model_config(shape)
    derived = {**TINY_LLAMA_CONFIG, "intermediate_size": 3 * config["hidden_size"]}
    return "-".join([TINY_MODEL_NAME, *(f"{k}{config[key]}" for k, key in SHAPE_KEYS.items()
                                        if config[key] != derived[key])])


def _recipe_fingerprint(shape: dict | None = None) -> str:
    recipe = {"version": RECIPE_VERSION, "seed": SEED, "config": model_config(shape),
              "corpus": CORPUS_MODULES, "special": SPECIAL_TOKENS, "chat": CHAT_TEMPLATE}
    if weight_dtype() != "bfloat16":  # (bf16 models keep the recipe they had before the dtype was chosen)
        recipe["dtype"] = weight_dtype()
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def identity(shape: dict | None = None) -> dict:
    """What a profile records of the tiny model: its name, shape and build recipe, not its folder."""
    return {"name": tiny_model_name(shape), "built_by": "profiler.tiny_model", "recipe": _recipe_fingerprint(shape),
            "recipe_version": RECIPE_VERSION, "seed": SEED, "config": model_config(shape), "dtype": weight_dtype()}


def _corpus_files() -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [stdlib / name for name in CORPUS_MODULES]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise FileNotFoundError(f"tokenizer corpus files missing from the standard library: {missing}")
    return files


def _train_tokenizer(out_dir: Path, config: dict) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config["vocab_size"],
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in _corpus_files()]
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=SPECIAL_TOKENS[0],
        eos_token=SPECIAL_TOKENS[1],
        pad_token=SPECIAL_TOKENS[2],
        model_max_length=config["max_position_embeddings"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)


def _build_weights(out_dir: Path, config: dict, bos_id: int, eos_id: int, pad_id: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(
        **config,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        torch_dtype=weight_dtype(),
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(hf_config).to(getattr(torch, weight_dtype()))
    model.save_pretrained(out_dir, safe_serialization=True)


def build_tiny_model(out_dir: str | Path, shape: dict | None = None) -> Path:
    """Build the tiny Llama of this shape (random weights, seed 0) and its tokenizer into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = model_config(shape)
    _train_tokenizer(out_dir, config)
    vocab = json.loads((out_dir / "tokenizer.json").read_text())["model"]["vocab"]
    special = {tok["content"]: tok["id"] for tok in json.loads(
        (out_dir / "tokenizer.json").read_text())["added_tokens"]}
    assert len(vocab) <= config["vocab_size"]
    _build_weights(out_dir, config, special[SPECIAL_TOKENS[0]], special[SPECIAL_TOKENS[1]],
                   special[SPECIAL_TOKENS[2]])
    (out_dir / "rllm_sim_model.json").write_text(json.dumps(
        {"name": tiny_model_name(shape), "recipe": _recipe_fingerprint(shape), "seed": SEED, "dtype": weight_dtype(),
         "built_by": "profiler.tiny_model.build_tiny_model"}, indent=2) + "\n")
    return out_dir


@contextlib.contextmanager
def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _is_current(folder: Path, shape: dict | None) -> bool:
    marker = folder / "rllm_sim_model.json"
    if not marker.exists() or not (folder / "model.safetensors").exists():
        return False
    return json.loads(marker.read_text()).get("recipe") == _recipe_fingerprint(shape)


def ensure_tiny_model(cache_dir: str | Path | None = None, shape: dict | None = None) -> Path:
    """The folder of the tiny model of this shape, built once and cached (safe across
    concurrent processes)."""
    name = tiny_model_name(shape)
    folder = Path(cache_dir or default_cache_dir()) / name
    if _is_current(folder, shape):
        return folder
    with _lock(folder.parent / f".{name}.lock"):
        if _is_current(folder, shape):
            return folder
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder.parent))
        try:
            build_tiny_model(staging, shape)
            if folder.exists():
                shutil.rmtree(folder)
            staging.rename(folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return folder
