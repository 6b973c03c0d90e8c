"""``hf-paged serve``: argument parsing, loading a saved model, the process end to end, the optional extra."""

from __future__ import annotations

import json
import re
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

pytest.importorskip("fastapi")

from server_harness import free_port, save_tiny_demo, serve_process, streamed_completion  # noqa: E402

from hf_paged.server import _deps  # noqa: E402
from hf_paged.loader import load_model  # noqa: E402
from hf_paged.server.cli import build_parser, main  # noqa: E402

pytestmark = pytest.mark.any_transformers  # .ci/run: newest Transformers only (see pyproject)


def test_parser_defaults_and_options():
    args = build_parser().parse_args(["serve", "some/dir"])
    got = (args.model, args.host, args.port, args.dtype, args.block_size)
    assert got == ("some/dir", "127.0.0.1", 8000, "auto", 16)
    args = build_parser().parse_args([
        "serve", "--demo", "--port", "9001", "--dtype", "bfloat16", "--served-model-name", "x", "--max-num-seqs", "4",
        "--max-model-len", "128", "--kv-memory-fraction", "0.5", "--block-size", "32", "--api-key", "k",
        "--max-waiting", "3", "--chat-template", "t.jinja", "--compile-model",
    ])
    assert args.demo and args.kv_memory_fraction == 0.5 and args.max_waiting == 3 and args.chat_template == "t.jinja"
    assert args.compile_model and not build_parser().parse_args(["serve", "x"]).compile_model


@pytest.mark.parametrize("argv", [
    ["serve"],  # neither MODEL nor --demo
    ["serve", "dir", "--demo"],
    ["serve", "--demo", "--num-blocks", "8", "--kv-memory-fraction", "0.5"],
    ["serve", "--demo", "--dtype", "int8"],
    ["serve", "--demo", "--max-num-seqs", "0"],
    ["serve", "--demo", "--kv-memory-fraction", "1.5"],
    ["serve", "/no/such/dir"],
])
def test_bad_arguments_exit(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


def test_missing_extra_says_how_to_install(monkeypatch):
    real = _deps.importlib.util.find_spec
    monkeypatch.setattr(_deps.importlib.util, "find_spec", lambda name: None if name == "fastapi" else real(name))
    with pytest.raises(ImportError, match=r"pip install 'hf-paged\[serve\]'"):
        _deps.require_serve_deps()


def test_import_hf_paged_does_not_import_the_server():
    code = "import sys, hf_paged; assert not [m for m in ('fastapi', 'uvicorn', 'hf_paged.server') if m in sys.modules]"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    return save_tiny_demo(tmp_path_factory.mktemp("saved") / "tiny-saved")


def test_load_model(saved_model):
    model, tok = load_model(str(saved_model), dtype="float32", device="cpu")
    assert model.config._attn_implementation == "paged"
    assert tok.chat_template and next(model.parameters()).dtype.is_floating_point


def test_serve_process_end_to_end(saved_model):
    """``python -m hf_paged serve DIR``: startup log, a chat request, SIGINT during a stream, clean exit."""
    args = (str(saved_model), "--num-blocks", "64", "--dtype", "float32", "--log-level", "info",
            "--shutdown-timeout", "0")
    with serve_process(*args) as (proc, base):
        models = httpx.get(f"{base}/v1/models", timeout=10).json()
        assert [m["id"] for m in models["data"]] == ["tiny-saved"]
        chat = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "temperature": 0}
        r = httpx.post(f"{base}/v1/chat/completions", json=chat, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 4
        body = {"prompt": "hello", "max_tokens": 240, "ignore_eos": True, "stream": True}
        lines = []
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=30) as stream:
            for line in stream.iter_lines():
                if not lines:
                    proc.send_signal(signal.SIGINT)  # shut down with this request in flight
                lines.append(line)
        out, _ = proc.communicate(timeout=30)
        # The stream was ended properly: aborted (or, on a fast machine, finished) and [DONE].
        events = [line for line in lines if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] in ("abort", "length")
    assert proc.returncode == 0, out
    assert "KV pool: 64 blocks of 16 tokens" in out and "dtype torch.float32 on cpu" in out
    assert "engine stopped" in out and "Traceback" not in out


@pytest.mark.parametrize("engine_process", [False, True], ids=["engine-thread", "engine-process"])
def test_serve_tensor_parallel(saved_model, engine_process):
    """``serve DIR --tensor-parallel-size 2`` on CPU (gloo): the tokens of one process, and SIGINT
    stops the worker rank too (no orphan, no forced termination). With ``--engine-process`` the engine
    process is rank 0 and starts rank 1."""
    from hf_paged import SamplingParams, generate_batch

    model, tok = load_model(str(saved_model), dtype="float32", device="cpu")
    want = generate_batch(model, ["hello"], SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True),
                          tokenizer=tok, progress=False)[0].text
    args = (str(saved_model), "--tensor-parallel-size", "2", "--num-blocks", "64", "--dtype", "float32",
            "--shutdown-timeout", "0", "--engine-process" if engine_process else "--no-engine-process")
    with serve_process(*args, timeout=180) as (proc, base):
        body = {"prompt": "hello", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
        r = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == want
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "tensor parallel over 2 ranks" in out and "engine stopped" in out
    assert "did not stop" not in out and "Traceback" not in out


def test_serve_data_parallel(saved_model):
    """``serve DIR --data-parallel-size 2`` on a local Ray: one process's tokens, streamed or not,
    both replicas' pools in /metrics and back to zero used blocks, a clean SIGINT."""
    pytest.importorskip("ray")
    from hf_paged import SamplingParams, generate_batch

    model, tok = load_model(str(saved_model), dtype="float32", device="cpu")
    prompts = ["hello", "the cat sat on", "one two three four five six seven eight nine ten eleven twelve"]
    want = [o.text for o in generate_batch(model, prompts, SamplingParams(max_new_tokens=6, temperature=0.0,
                                                                          ignore_eos=True),
                                           tokenizer=tok, progress=False)]
    args = (str(saved_model), "--data-parallel-size", "2", "--num-blocks", "64", "--dtype", "float32",
            "--device", "cpu", "--shutdown-timeout", "0")
    with serve_process(*args, timeout=240) as (proc, base):
        body = {"prompt": prompts, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
        r = httpx.post(f"{base}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])] == want
        assert streamed_completion(base, dict(body, prompt=prompts[1])) == want[1]
        metrics = httpx.get(f"{base}/metrics", timeout=30).text
        assert re.search(r"^hf_paged_kv_blocks_total\S* 128(\.0)?$", metrics, re.M), metrics  # 2 x 64 blocks
        assert re.search(r"^hf_paged_kv_blocks_used\S* 0(\.0)?$", metrics, re.M), metrics
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, out
    assert "2 replicas on Ray" in out and "engine stopped" in out and "Traceback" not in out


def _exit_message(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_missing_path_fails_at_once_without_the_hub(capsys):
    start = time.monotonic()
    for path in ("/no/such/dir", "./nope", "~/no-such-model-dir", os.path.join("a", "b", "c")):
        assert "does not exist" in _exit_message(["serve", path], capsys)
    assert time.monotonic() - start < 2.0


def test_model_directory_without_tokenizer(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    msg = _exit_message(["serve", str(tmp_path)], capsys)
    assert "has no tokenizer" in msg and "tokenizer.json" in msg


def test_loader_tokenizer_failure_is_one_line(saved_model, monkeypatch, capsys):
    import hf_paged.server.cli as cli

    def broken(*a, **k):
        raise ValueError("Couldn't instantiate the backend tokenizer\nmore lines\nof traceback text")

    monkeypatch.setattr(cli, "load_model", broken)
    msg = _exit_message(["serve", str(saved_model), "--port", str(free_port())], capsys)
    assert msg.endswith("Couldn't instantiate the backend tokenizer")


def test_port_in_use(saved_model, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        msg = _exit_message(["serve", str(saved_model), "--port", str(port)], capsys)
    assert f"127.0.0.1:{port}" in msg and "already in use" in msg


def test_unavailable_device(saved_model, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    msg = _exit_message(["serve", str(saved_model), "--device", "cuda", "--port", str(free_port())], capsys)
    assert "--device" in msg and "cuda" in msg


def test_max_model_len_above_the_model_needs_the_override(saved_model, monkeypatch, capsys):
    import hf_paged.server.cli as cli

    seen = {}
    monkeypatch.setattr(cli, "run_app", lambda app, args: seen.update(app=app) or 0)
    base = ["serve", str(saved_model), "--num-blocks", "64", "--dtype", "float32", "--port", str(free_port())]
    msg = _exit_message(base + ["--max-model-len", "300"], capsys)  # the tiny model has 256 positions
    assert "max_position_embeddings (256)" in msg and "--allow-long-max-model-len" in msg
    assert main(base + ["--max-model-len", "300", "--allow-long-max-model-len"]) == 0
    assert seen["app"].state.config.max_model_len == 300
    assert main(base + ["--max-model-len", "200"]) == 0
    assert seen["app"].state.config.max_model_len == 200
