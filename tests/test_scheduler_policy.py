"""A plugin of the ``hf_paged_request_priority`` hook reorders admission; without one it is FCFS."""

import torch
from tiny_models import VOCAB, make_pair

from hf_paged import Engine, SamplingParams
from hf_paged.kernels import hookimpl, plugin_manager


def _admission_order(lengths):
    paged, _ = make_pair("llama-gqa")
    engine = Engine(paged, num_blocks=64, block_size=4, max_num_seqs=1)
    g = torch.Generator().manual_seed(0)
    ids = {engine.add_request(torch.randint(4, VOCAB, (n,), generator=g).tolist(),
                              SamplingParams(max_new_tokens=2, temperature=0.0)): n for n in lengths}
    order = []
    while engine.has_unfinished():
        for update in engine.step():
            if update.finished:
                order.append(ids[update.request_id])
    assert engine.kv_pool.blocks.num_free == 64
    return order


class _LongestFirst:
    @hookimpl
    def hf_paged_request_priority(self, request_id, prompt_token_ids, sampling_params):
        return -len(prompt_token_ids)


def test_first_come_first_served_by_default():
    assert _admission_order([3, 9, 5]) == [3, 9, 5]


def test_a_priority_plugin_reorders_admission():
    plugin = _LongestFirst()
    plugin_manager().register(plugin, name="longest-first")
    try:
        assert _admission_order([3, 9, 5, 9]) == [9, 9, 5, 3]
    finally:
        plugin_manager().unregister(plugin)
