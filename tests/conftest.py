"""Test setup: 8 simulated CPU devices (set before JAX starts) and tiny HF checkpoint builders."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "internlm2"


@pytest.fixture(scope="session")
def tokenizer_path():
    path = Path(os.environ.get("INTERNLM2_TOKENIZER", SHARED / "tokenizer.model"))
    if not path.is_file():
        pytest.skip(f"the InternLM2 tokenizer is not at {path} (set INTERNLM2_TOKENIZER)")
    return path
