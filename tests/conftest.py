"""Shared pytest fixtures: offline mode, tiny random models (built once per session), the bundled model, the default config."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

# Offline before anything imports huggingface_hub / transformers (they read these at import time).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
for _path in (str(REPO_ROOT), str(TESTS_DIR)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from tiny_models import build_tiny_model, bundled_tokenizer  # noqa: E402


def pytest_configure(config):
    """Make sure the whole session runs offline, whatever the environment says; one torch thread.

    Tiny models are all overhead: on a busy 2-core machine two intra-op threads make a forward pass
    30x slower (spin-waiting) than one. MECHAMAP_TEST_TORCH_THREADS overrides (0 keeps torch's default).
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    threads = int(os.environ.get("MECHAMAP_TEST_TORCH_THREADS", "1"))
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def _offline_session():
    """Every test runs with the Hugging Face Hub switched off."""
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    assert os.environ.get("TRANSFORMERS_OFFLINE") == "1"
    yield


class TinyModels:
    """Session cache of tiny random models: each arch is built (and loaded) once."""

    def __init__(self, root: Path):
        self.root = root
        self._paths: dict[str, Path] = {}
        self._loaded: dict[str, object] = {}

    def path(self, arch: str) -> Path:
        """Folder of the saved tiny `arch` model (config, weights and the bundled tokenizer)."""
        if arch not in self._paths:
            self._paths[arch] = build_tiny_model(arch, self.root / arch)
        return self._paths[arch]

    def lm(self, arch: str):
        """LoadedModel of the tiny `arch` model on the CPU, via mechamap_core.load_model (shared; do not mutate)."""
        if arch not in self._loaded:
            from mechamap_core import load_model

            path = self.path(arch)
            lm = load_model(str(path), device="cpu")
            reference = bundled_tokenizer()
            probe = "New York giraffe [CLS] 1999"
            if lm.tokenizer(probe)["input_ids"] != reference(probe)["input_ids"]:
                # transformers 5 overrides tokenizer_config.json for some model types (qwen2 always gets
                # Qwen2Tokenizer); real checkpoints ship their own tokenizer, so use the saved one as is.
                lm = dataclasses.replace(lm, tokenizer=type(reference).from_pretrained(path, local_files_only=True))
            self._loaded[arch] = lm
        return self._loaded[arch]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> TinyModels:
    """Builds tiny models on demand, once per session, in a session tmp dir."""
    return TinyModels(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_models):
    return tiny_models.lm("gpt2")


@pytest.fixture(scope="session")
def tiny_bert(tiny_models):
    return tiny_models.lm("bert")


@pytest.fixture(scope="session")
def bundled_lm():
    """The bundled all-MiniLM-L6-v2 model on the CPU."""
    from mechamap_core import load_model

    return load_model("bundled", device="cpu")


@pytest.fixture(scope="session")
def default_cfg():
    """configs/default.yaml as a ScanConfig (copy it before changing fields)."""
    from mechamap_core import load_config

    return load_config(REPO_ROOT / "configs" / "default.yaml")
