"""Graphs of mixed steps (prompt chunks beside decodes, padded to a token bucket) give the eager
tokens. On CPU the capture is emulated (a replay reruns the forward into the captured output), so
the padding, sequence padding, placeholder tokens and the LM head after the replay are all checked."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_pair

from hf_paged import Engine, SamplingParams
from hf_paged.cuda_graphs import MixedGraphs, mixed_graphs_supported


@pytest.mark.parametrize("overlap", [False, True])
def test_mixed_graphs_match_eager_steps(emulated_capture, overlap):
    _, paged = make_pair("llama-gqa")
    assert mixed_graphs_supported(paged)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(4, 90, (int(n),), generator=g).tolist() for n in torch.randint(1, 70, (12,), generator=g)]
    params = [SamplingParams(max_new_tokens=int(n), temperature=0.0, ignore_eos=True)
              for n in torch.randint(1, 20, (12,), generator=g)]
    kwargs = dict(num_blocks=128, block_size=4, max_num_seqs=5, max_num_batched_tokens=100, async_scheduling=overlap)
    eager = Engine(paged, **kwargs)
    want = [o.token_ids for o in eager.generate(prompts, params)]

    engine = Engine(paged, **kwargs)
    graphs = MixedGraphs(paged, engine.kv_pool, max_seqs=5, max_tokens=100, max_context=512,
                         mask=engine.runner._mask)
    assert graphs.buckets == [64]  # one bucket: steps of more than 64 tokens run eagerly
    graphs.capture_all()
    engine.runner._mixed_graphs = graphs
    replays = []
    run = graphs.run
    graphs.run = lambda host, last=None: replays.append(host.input_ids.numel()) or run(host, last)
    assert [o.token_ids for o in engine.generate(prompts, params)] == want
    assert replays and max(replays) <= 64 and any(n > 5 for n in replays)  # prompt chunks went through graphs
    assert engine.kv_pool.blocks.num_free == engine.kv_pool.blocks.num_blocks
