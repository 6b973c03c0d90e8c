"""Tensor parallelism: Transformers' tp_plan over gloo on CPU, 2 ranks, against a single-process run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

import hf_paged
from hf_paged.cache.geometry import check_tensor_parallel, kv_geometry, tensor_parallel_size
from tiny_models import make_config
from tp_cases import engine_cases, generate_inputs

HERE = Path(__file__).parent
TIMEOUT_S = 120


# -- checks that need no second process -----------------------------------------------------------


def test_check_tensor_parallel_errors():
    cfg = make_config("llama-gqa")  # 4 heads, 2 KV heads
    check_tensor_parallel(cfg, 1)
    check_tensor_parallel(cfg, 2)
    with pytest.raises(ValueError, match="num_key_value_heads=2, not divisible by the tensor-parallel size 4"):
        check_tensor_parallel(cfg, 4)
    with pytest.raises(ValueError, match="num_attention_heads=4, not divisible by the tensor-parallel size 3"):
        check_tensor_parallel(cfg, 3)
    gpt2 = GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=32)
    with pytest.raises(ValueError, match="gpt2 has no tensor-parallel plan"):
        check_tensor_parallel(gpt2, 2)
    with pytest.raises(ValueError, match="positive int"):
        check_tensor_parallel(cfg, 0)


def test_single_process_model_is_not_sharded():
    model = AutoModelForCausalLM.from_config(make_config("llama-gqa"), attn_implementation="paged")
    assert tensor_parallel_size(model) == 1
    assert kv_geometry(model) == (2, 2, 16)
    assert hf_paged.Engine(model, num_blocks=4).tp is None


def test_symmetric_styles_replace_row_parallel_ones_only_while_loading():
    """`row_parallel_all_reduce` swaps Transformers' replicated-output row-parallel styles for subclasses
    with the same settings inside the block, restores them after it, and gives a gloo group no
    symmetric buffer (symmetric memory is CUDA-only; gloo keeps ``dist.all_reduce``)."""
    import torch.distributed as dist
    from transformers.distributed.tensor_parallel import ALL_PARALLEL_STYLES

    from hf_paged.tp_all_reduce import enable_symmetric_memory, row_parallel_all_reduce

    before = dict(ALL_PARALLEL_STYLES.items())
    with row_parallel_all_reduce():
        inside = dict(ALL_PARALLEL_STYLES.items())
    assert dict(ALL_PARALLEL_STYLES.items()) == before
    assert type(inside["rowwise"]).__name__ == "SymmetricRowwise"
    assert isinstance(inside["rowwise"], type(before["rowwise"])) and vars(inside["rowwise"]) == vars(before["rowwise"])
    assert inside["colwise"] is before["colwise"]
    with row_parallel_all_reduce(max_bytes=0):
        assert dict(ALL_PARALLEL_STYLES.items()) == before
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert not enable_symmetric_memory(dist.group.WORLD)
    finally:
        dist.destroy_process_group()


def test_symmetric_all_reduce_picks_one_shot_or_two_shot_by_size(monkeypatch):
    """Up to ``one_shot_max_bytes`` the one-shot kernel sums straight from the input; beyond it the message
    goes through the staging buffer to two-shot, unless it does not split into the ranks' 16-byte pieces.
    (The kernels are CUDA-only: stand-ins record which one ran; bench/all_reduce.py checks their sums.)"""
    from types import SimpleNamespace

    import hf_paged.tp_all_reduce as ar

    calls = []

    def one_shot(staging, x, op, group):
        calls.append(("one_shot", x.numel()))
        return x * 2

    def two_shot(staging, op, group, out):
        calls.append(("two_shot", staging.numel()))
        return out.copy_(staging * 2)

    monkeypatch.setattr(torch.ops, "symm_mem", SimpleNamespace(one_shot_all_reduce_copy=one_shot,
                                                               two_shot_all_reduce_out=two_shot), raising=False)
    monkeypatch.setitem(ar._buffers, "g", torch.zeros(1 << 12, dtype=torch.uint8))
    monkeypatch.setitem(ar._world_sizes, "g", 2)
    x = torch.randn(512, dtype=torch.bfloat16)  # 1 KB, 2 x 8 bf16 per piece: divisible
    for limit, expected in ((1024, "one_shot"), (1023, "two_shot")):
        assert torch.equal(ar.symmetric_all_reduce(x, "g", one_shot_max_bytes=limit), x * 2)
        assert calls.pop() == (expected, 512)
    odd = torch.randn(500, dtype=torch.bfloat16)  # not a multiple of 16 elements: one-shot whatever its size
    assert torch.equal(ar.symmetric_all_reduce(odd, "g", one_shot_max_bytes=0), odd * 2)
    assert calls == [("one_shot", 500)]


def test_symmetric_all_reduce_takes_the_barrier_free_kernel_for_small_half_precision_messages(monkeypatch):
    """bf16/fp16 messages up to the group's ``lamport_max_bytes`` (or a smaller per-call limit) go to the
    barrier-free kernel; larger ones, fp32 and ``lamport_max_bytes=0`` to one-shot / two-shot."""
    from types import SimpleNamespace

    import hf_paged.tp_all_reduce as ar

    calls = []

    def lamport(x, receive, peers, counter, slot_elems, rank, world):
        calls.append(("lamport", x.numel(), slot_elems, rank, world))
        return x * 2

    def one_shot(staging, x, op, group):
        calls.append(("one_shot", x.numel()))
        return x * 2

    monkeypatch.setattr(torch.ops, "symm_mem", SimpleNamespace(one_shot_all_reduce_copy=one_shot), raising=False)
    monkeypatch.setitem(ar._buffers, "g", torch.zeros(1 << 14, dtype=torch.uint8))
    monkeypatch.setitem(ar._world_sizes, "g", 2)
    monkeypatch.setitem(ar._lamport, "g", ar._LamportGroup(SimpleNamespace(all_reduce=lamport), None, None, None, 1,
                                                           2048, 1024))
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(1024, dtype=dtype)  # 2 KB: at the limit
        assert torch.equal(ar.symmetric_all_reduce(x, "g"), x * 2)
        assert calls.pop() == ("lamport", 1024, 1024, 1, 2)
    for x, limit in ((torch.randn(1025, dtype=torch.bfloat16), None), (torch.randn(512, dtype=torch.float32), None),
                     (torch.randn(8, dtype=torch.bfloat16), 0), (torch.randn(1024, dtype=torch.bfloat16), 2046)):
        assert torch.equal(ar.symmetric_all_reduce(x, "g", lamport_max_bytes=limit), x * 2)
        assert calls.pop() == ("one_shot", x.numel())


def test_barrier_free_bound_by_ranks_and_staging_buffer():
    """By default two ranks sum up to LAMPORT_MAX_BYTES without a barrier and more ranks less (each sends to
    every peer); an explicit bound stays as given; neither passes the staging buffer."""
    import hf_paged.tp_all_reduce as ar

    big = 1 << 30
    assert ar._lamport_bound(None, 2, big) == ar.LAMPORT_MAX_BYTES
    assert ar._lamport_bound(None, 4, big) == ar.LAMPORT_MAX_BYTES // 6
    assert ar._lamport_bound(None, 1, big) == ar.LAMPORT_MAX_BYTES
    assert ar._lamport_bound(None, 2, 1 << 20) == 1 << 20
    assert ar._lamport_bound(0, 2, big) == 0 and ar._lamport_bound(12345, 8, big) == 12345


def test_barrier_free_all_reduce_kernel_on_one_rank():
    """`triton_all_reduce.all_reduce` under the interpreter with one rank (its own peer): the sum is the input
    (-0.0 sent as +0.0), the call counter walks the three receive buffers and each is cleared after reading,
    messages of any length (masked tails), bf16 and fp16. Two ranks over NVLink: bench/all_reduce.py."""
    pytest.importorskip("triton")
    from hf_paged.kernels import triton_all_reduce as tar

    device = "cuda" if torch.cuda.is_available() else "cpu"
    slot_elems = 3000
    receive = torch.full((tar.receive_elems(1, slot_elems),), tar.NOT_WRITTEN, dtype=torch.int16, device=device)
    peers = torch.zeros(1, dtype=torch.int64, device=device)  # its own buffer, 0 elements away
    counter = torch.zeros(2, dtype=torch.int32, device=device)
    for call, (n, dtype) in enumerate([(100, torch.bfloat16), (3000, torch.float16), (1024, torch.bfloat16),
                                       (7, torch.float16)]):
        x = torch.randn(n, device=device).to(dtype)
        x[:2] = -0.0
        out = tar.all_reduce(x, receive, peers, counter, slot_elems, 0, 1)
        assert torch.equal(out, x) and not torch.signbit(out[:2]).any()
        assert counter.tolist() == [call + 1, 0]
        assert (receive == tar.NOT_WRITTEN).all()


def test_barrier_free_all_reduce_kernel_reaches_a_peer_by_its_offset():
    """Rank 0 of two under the interpreter, its peer's buffer 1 x its size further on in memory: its partials land
    in the peer's buffer at rank 0's slot, and the sum takes the peer's partials found in its own buffer (put
    there first, as the peer's launch would)."""
    pytest.importorskip("triton")
    from hf_paged.kernels import triton_all_reduce as tar

    device = "cuda" if torch.cuda.is_available() else "cpu"
    slot_elems, n = 1024, 1000
    elems = tar.receive_elems(2, slot_elems)
    both = torch.full((2 * elems,), tar.NOT_WRITTEN, dtype=torch.int16, device=device)
    mine, peer = both[:elems], both[elems:]
    x0, x1 = (torch.randn(n, device=device).to(torch.bfloat16) for _ in range(2))
    x0[0] = -0.0
    mine[slot_elems: slot_elems + n] = x1.view(torch.int16)  # rank 1's partials, slot (0 x 2 + 1)
    counter = torch.zeros(2, dtype=torch.int32, device=device)
    out = tar.all_reduce(x0, mine, torch.tensor([0, elems], device=device), counter, slot_elems, 0, 2)
    # Within a bf16 step: Triton's interpreter rounds the fp32 sum toward zero (the GPU to nearest, as NCCL).
    torch.testing.assert_close(out.float(), x0.float() + x1.float(), rtol=2**-7, atol=0)
    sent = peer[:n].view(torch.bfloat16)
    assert torch.equal(sent, x0) and not torch.signbit(sent[0])  # -0.0 sent as +0.0
    assert (mine == tar.NOT_WRITTEN).all() and (peer[n:] == tar.NOT_WRITTEN).all()
    assert counter.tolist() == [1, 0]


@pytest.mark.gpu
def test_barrier_free_all_reduce_replays_from_a_cuda_graph():
    """Captured once, the launch picks the next receive buffer at every replay (the counter lives on the device)."""
    from hf_paged.kernels import triton_all_reduce as tar

    slot_elems = 4096
    receive = torch.full((tar.receive_elems(1, slot_elems),), tar.NOT_WRITTEN, dtype=torch.int16, device="cuda")
    peers = torch.zeros(1, dtype=torch.int64, device="cuda")
    counter = torch.zeros(2, dtype=torch.int32, device="cuda")
    x = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    tar.all_reduce(x, receive, peers, counter, slot_elems, 0, 1)  # compiled outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [tar.all_reduce(x, receive, peers, counter, slot_elems, 0, 1) for _ in range(5)]
    for replay in range(2):
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(out, x) for out in outs)
        assert counter.tolist() == [1 + 5 * (replay + 1), 0] and (receive == tar.NOT_WRITTEN).all()


def test_greedy_steps_under_tp_take_no_broadcast(monkeypatch):
    """Every rank holds the same gathered logits, so greedy rows need no broadcast from rank 0: a rank
    other than 0 takes its own arg-max. A sampled row still waits for rank 0's draw."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from hf_paged import SamplingParams
    from hf_paged.engine.sampler import Sampler
    from hf_paged.engine.sequence import Request
    from hf_paged.engine.tensor_parallel import BroadcastSampler

    broadcasts = []
    monkeypatch.setattr(dist, "broadcast", lambda tensor, **kw: broadcasts.append(tensor.clone()))
    sampler = BroadcastSampler(Sampler(), SimpleNamespace(rank=1, group=None))
    logits = torch.randn(2, 50)

    def seqs(params):
        request = Request("r", [1, 2], params, frozenset())
        return [SimpleNamespace(request=request, token_ids=[1, 2], num_prompt_tokens=2)] * 2

    assert sampler(logits, seqs(SamplingParams(temperature=0.0))).token_ids == logits.argmax(-1).tolist()
    assert broadcasts == []
    sampler.tokens(logits, seqs(SamplingParams(temperature=0.8)))
    assert len(broadcasts) == 1


def test_paged_cache_takes_per_rank_kv_heads():
    cfg = make_config("llama-gqa")  # 2 layers, 2 KV heads of dim 16
    shard = torch.randn(1, 1, 3, 16)
    cache = hf_paged.PagedCache(cfg, num_blocks=4, block_size=4, tp_size=2)
    k, _ = cache.update(shard, shard, 0)
    assert cache.pool.num_kv_heads == 1 and k.shape[2] == 1
    with pytest.raises(ValueError, match=r"2 KV heads \(1 per tensor-parallel rank\).*gave 2 heads"):
        hf_paged.PagedCache(cfg, num_blocks=4, tp_size=2).update(torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16), 0)
    # Without tp_size (and no process group) a shard is an error that says what to pass.
    with pytest.raises(ValueError, match="pass tp_size=model.tp_size"):
        hf_paged.PagedCache(cfg, num_blocks=4).update(shard, shard, 0)
    with pytest.raises(ValueError, match="num_key_value_heads=2 is not divisible by the tensor-parallel size 4"):
        hf_paged.PagedCache(cfg, tp_size=4)


# -- two ranks --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("tp") / "llama"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(make_config("llama-gqa")).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def single_process(tiny_llama):
    """What one process generates (the oracle of the 2-rank runs)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="paged").eval()
    ids, mask = generate_inputs()
    gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    prompts, params, engine_kwargs = engine_cases()
    outs = hf_paged.Engine(model, **engine_kwargs).generate(prompts, params, progress=False)
    return {
        "generate": gen[:, ids.shape[1]:].tolist(),
        "engine": [o.samples[0].token_ids if o.samples else o.error for o in outs],
        "params": params,
    }


def _env() -> dict:
    # The checkout and tests/ importable in the rank processes.
    return dict(os.environ, OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")]))


def _run(cmd: list[str]) -> str:
    """Run ``cmd`` to success; returns its stderr (its children's too: the resource tracker's among them)."""
    env = _env()
    # A new session, so that a hung run is ended with all the ranks it started.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} timed out after {TIMEOUT_S} s:\n{stderr[-6000:]}")
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{stdout[-3000:]}\n{stderr[-6000:]}"
    return stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_same_as_single(tokens: list, single: dict) -> None:
    """Greedy and seeded requests match the single process; unseeded samples may differ."""
    for i, (got, want, p) in enumerate(zip(tokens, single["engine"], single["params"])):
        if p.temperature == 0.0 or p.seed is not None or isinstance(want, str):
            assert got == want, f"request {i}"


def test_torchrun_two_ranks_match_single_process(tiny_llama, single_process, tmp_path):
    """``torchrun --nproc-per-node 2``: model.generate, generate_batch and Engine on gloo."""
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
          "--master-port", str(_free_port()),
          str(HERE / "tp_worker_script.py"), str(tiny_llama), str(tmp_path)])
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # Each rank's pool holds its own KV head; every rank decided the same tokens (sampled ones included).
    assert ranks[0] == ranks[1]
    r = ranks[0]
    assert r["tp_size"] == 2 and r["plain_tp_size"] == 2 and r["kv_pool_heads"] == 1
    assert r["preemptions"] > 0
    assert r["generate"] == single_process["generate"]
    _assert_same_as_single(r["generate_batch"], single_process)
    _assert_same_as_single(r["engine"], single_process)
    # Column-parallel q/k/v and gate/up fused per rank (two groups in each of the tiny model's layers).
    assert r["fused_groups"] == 2 * r["layers"] and r["fused_logits_max_diff"] < 1e-5, r
    assert r["fused_grad_logits_max_diff"] < 1e-5, r
    _assert_same_as_single(r["engine_unfused"], single_process)


def test_driver_engine_over_spawned_ranks(tiny_llama, single_process, tmp_path):
    """`start_tensor_parallel_engine`: this process is rank 0, rank 1 follows over a queue."""
    out = tmp_path / "driver.json"
    stderr = _run([sys.executable, str(HERE / "tp_driver_script.py"), str(tiny_llama), str(out)])
    r = json.loads(out.read_text())
    _assert_same_as_single(r["engine"], single_process)
    assert r["finished"] == ["length", "abort"]
    assert r["blocks_free_end"] == r["num_blocks"]
    assert r["group_destroyed"]
    # The worker left on its own (no terminate after the join timeout), promptly, and released what it held.
    assert r["worker_exitcodes"] == [0] and r["shutdown_s"] < 15, r
    assert "leaked" not in stderr, stderr[-3000:]


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" in f.read()  # a zombie waiting for its new parent to reap it has exited
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_lost_ranks_fail_the_engine_and_never_outlive_it(tiny_llama, tmp_path):
    """A worker rank killed between steps: the driver's next step raises, naming the rank. A driver killed
    with SIGKILL (a server killed) runs no shutdown: its worker ranks must not live on holding GPUs."""
    out = tmp_path / "lost.json"
    proc = subprocess.run([sys.executable, str(HERE / "tp_driver_script.py"), str(tiny_llama), str(out), "lose-ranks"],
                          env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["error"] is not None and "rank 1" in r["error"] and "exited" in r["error"], r
    assert r["raised_after_s"] < 5, r
    pids = r["worker_pids"]
    deadline = time.monotonic() + 30
    while not all(_gone(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert all(_gone(pid) for pid in pids), f"worker ranks {pids} outlived their driver"


def _one_rank_barrier_free_group(monkeypatch, name: str, device: str):
    """Group ``name`` of one rank whose sums take the barrier-free kernel (under the interpreter on the CPU)."""
    import hf_paged.tp_all_reduce as ar
    from hf_paged.kernels import triton_all_reduce as tar

    slot_elems = 1 << 14
    receive = torch.full((tar.receive_elems(1, slot_elems),), tar.NOT_WRITTEN, dtype=torch.int16, device=device)
    group = ar._LamportGroup(tar, receive, torch.zeros(1, dtype=torch.int64, device=device),
                             torch.zeros(2, dtype=torch.int32, device=device), 0, 2 * slot_elems, slot_elems)
    monkeypatch.setitem(ar._lamport, name, group)
    monkeypatch.setitem(ar._world_sizes, name, 1)
    return group


def test_barrier_free_sum_with_residual_and_rms_norm_in_one_kernel(monkeypatch):
    """The kernel's epilogues against the ops they replace (one rank: the sum is the partial): ``residual + sum``
    and Llama's RMSNorm of it, rows of a width that is not a power of two; the add alone on the flat layout; the
    epilogue's own launch, for sums taken another way, bit for bit the same."""
    pytest.importorskip("triton")
    import hf_paged.tp_all_reduce as ar

    device = "cuda" if torch.cuda.is_available() else "cpu"
    _one_rank_barrier_free_group(monkeypatch, "g", device)
    x, residual = (torch.randn(3, 96, device=device).to(torch.float16) for _ in range(2))
    weight = torch.randn(96, device=device).to(torch.float16)
    summed, normed = ar._symmetric_add_rms_norm(x, residual, weight, 1e-5, "g", 0, None)
    assert torch.equal(summed, residual + x)
    torch.testing.assert_close(normed, ar._rms_norm(residual + x, weight, 1e-5), rtol=2e-3, atol=2e-3)
    assert torch.equal(ar._symmetric_add(x, residual, "g", 0, None), residual + x)
    # The epilogue alone (after a sum that took another way) rounds alike.
    from hf_paged.kernels import triton_all_reduce as tar

    alone = tar.add_rms_norm(x, residual, weight, 1e-5)
    assert torch.equal(alone[0], summed) and torch.equal(alone[1], normed)
    # Not the barrier-free path (fp32): the same results from the separate sum, add and norm.
    monkeypatch.setattr(ar, "_symmetric", lambda x, *args: x)
    xf, rf, wf = x.float(), residual.float(), weight.float()
    summed, normed = ar._symmetric_add_rms_norm(xf, rf, wf, 1e-5, "g", 0, None)
    assert torch.equal(summed, rf + xf)
    torch.testing.assert_close(normed, ar._rms_norm(rf + xf, wf, 1e-5))  # on a GPU: the epilogue's own launch


@pytest.mark.parametrize("norm_kind", ["llama", "gemma"])
def test_compiled_layer_sums_take_their_add_and_rms_norm(monkeypatch, norm_kind):
    """Under torch.compile with `epilogue_fusion`, a row-parallel sum followed by a residual add and a Llama
    RMSNorm becomes one op, a sum followed by an add alone another; a norm that is not Llama's (Gemma's: the
    weight as 1 + w, multiplied in fp32) keeps its own ops and only the add joins the sum. Outputs match the
    eager layer's."""
    pytest.importorskip("triton")
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    import hf_paged.tp_all_reduce as ar

    device = "cuda" if torch.cuda.is_available() else "cpu"
    _one_rank_barrier_free_group(monkeypatch, "g", device)
    # Compile afresh: a cached graph (an earlier run's) skips the passes.
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)
    monkeypatch.setattr(torch._functorch.config, "enable_autograd_cache", False)
    rewrites = []
    fuse = ar.fuse_all_reduce_epilogues
    monkeypatch.setattr(ar, "fuse_all_reduce_epilogues", lambda graph: rewrites.append(
        (fuse(graph), sorted(str(n.target) for n in graph.nodes if "hf_paged" in str(n.target)))))
    torch.manual_seed(0)
    norm = (LlamaRMSNorm if norm_kind == "llama" else GemmaRMSNorm)(96, eps=1e-5).to(device, torch.float16)
    norm.weight.data.normal_()
    w_o, w_d = (torch.randn(96, 64, dtype=torch.float16, device=device) / 8 for _ in range(2))

    def layer(h, residual):
        hidden = residual + ar.symmetric_all_reduce(torch.nn.functional.linear(h, w_o), "g")
        normed = norm(hidden)
        return hidden + ar.symmetric_all_reduce(torch.nn.functional.linear(normed[:, :64], w_d), "g"), normed

    h, residual = (torch.randn(4, n, dtype=torch.float16, device=device) for n in (64, 96))
    with torch.inference_mode():
        eager = layer(h, residual)
        torch._dynamo.reset()
        compiled = torch.compile(layer, options={"post_grad_custom_post_pass": ar.epilogue_fusion()})(h, residual)
    second = "add_rms_norm" if norm_kind == "llama" else "add"
    assert rewrites == [(2, ["hf_paged.symmetric_all_reduce_add.default",
                             f"hf_paged.symmetric_all_reduce_{second}.default"])]
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)
