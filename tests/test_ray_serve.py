"""The server as a Ray Serve deployment: two CPU replicas behind Serve's proxy answer like one engine."""

from __future__ import annotations


import httpx
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
pytest.importorskip("fastapi")

from hf_paged import SamplingParams, generate_batch  # noqa: E402
from hf_paged.loader import load_model  # noqa: E402
from hf_paged.server.ray_serve import build, openai_deployment  # noqa: E402
from server_harness import free_port, save_tiny_demo, streamed_completion  # noqa: E402

pytestmark = pytest.mark.any_transformers  # .ci/run: newest Transformers only (see pyproject)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    return save_tiny_demo(tmp_path_factory.mktemp("serve") / "tiny-saved")


def test_serve_run_two_replicas(saved_model):
    model, tok = load_model(str(saved_model), dtype="float32", device="cpu")
    prompts = ["hello", "the cat sat on"]
    params = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
    want = [o.text for o in generate_batch(model, prompts, params, tokenizer=tok, progress=False)]
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = openai_deployment(str(saved_model), num_replicas=2, num_gpus=0,
                                model_kwargs={"dtype": "float32", "device": "cpu"}, engine_kwargs={"num_blocks": 64},
                                server_config={"model_name": "tiny"})
        serve.run(app, name="hf-paged", route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        body = {"model": "tiny", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
        for prompt, text in zip(prompts, want):
            r = httpx.post(f"{base}/v1/completions", json=dict(body, prompt=prompt), timeout=120)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == text
        assert streamed_completion(base, dict(body, prompt=prompts[1])) == want[1]
        bad = httpx.post(f"{base}/v1/completions", json=dict(body, prompt="hi", max_tokens=-1), timeout=60)
        assert bad.status_code == 400 and "max_tokens" in bad.text  # the same validation as hf-paged serve
    finally:
        serve.shutdown()
        ray.shutdown()


def test_application_builder_arguments():
    with pytest.raises(ValueError, match="needs model=PATH"):
        build({})
    with pytest.raises(ValueError, match=r"unknown arguments \['replicas'\]"):
        build({"model": "x", "replicas": "2"})
