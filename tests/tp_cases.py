"""Inputs shared by the tensor-parallel tests and their torchrun script (no pytest imports here)."""

import torch

from hf_paged import SamplingParams


def generate_inputs():
    ids = torch.tensor([[0, 0, 1, 5, 9, 13], [1, 7, 22, 40, 3, 11]])
    return ids, (ids != 0).long()


def engine_cases():
    """Mixed requests: shared prefixes, lengths, greedy and sampled (seeded and not), a bad prompt."""
    g = torch.Generator().manual_seed(7)
    prefix = torch.randint(4, 96, (20,), generator=g).tolist()
    prompts, params = [], []
    for i in range(12):
        body = torch.randint(4, 96, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g).tolist()
        prompts.append([1] + (prefix if i % 3 == 0 else []) + body)
        if i % 4 == 3:
            params.append(SamplingParams(max_new_tokens=6 + i, temperature=1.0, seed=i if i % 8 == 3 else None))
        else:
            params.append(SamplingParams(max_new_tokens=6 + i, temperature=0.0, ignore_eos=True))
    prompts.append([500])  # outside the vocabulary: finishes with an error on every rank
    params.append(SamplingParams(max_new_tokens=4))
    # A small pool forces preemptions; prefix caching shares the common prefix.
    return prompts, params, dict(num_blocks=14, block_size=8, max_num_seqs=6, max_num_batched_tokens=48)
