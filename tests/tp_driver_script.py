"""Run by tests/test_distributed.py: `start_tensor_parallel_engine` with 2 CPU ranks (gloo).

argv: model_dir out_json. This process is rank 0 and drives the engine; rank 1 is spawned.
"""

import json
import os
import signal
import sys
import time

import torch.distributed as dist

from hf_paged import SamplingParams
from hf_paged.distributed import DriverEngine, start_tensor_parallel_engine

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from tp_cases import engine_cases  # noqa: E402


def die_with_workers_running(model_dir: str, out_json: str) -> None:
    """Write the workers' pids, then die as a killed server does: no shutdown runs."""
    engine = start_tensor_parallel_engine(model_dir, 2, tokenizer=None, num_blocks=64, max_num_seqs=4)
    with open(out_json, "w") as f:
        json.dump({"worker_pids": [p.pid for p in engine._processes]}, f)
    os.kill(os.getpid(), signal.SIGKILL)


def main(model_dir: str, out_json: str) -> None:
    prompts, params, engine_kwargs = engine_cases()
    # Async scheduling (the CUDA default) here, synchronous steps in the torchrun test: both keep the ranks in step.
    with start_tensor_parallel_engine(model_dir, 2, tokenizer=None, async_scheduling=True, **engine_kwargs) as engine:
        assert engine.async_scheduling
        assert isinstance(engine, DriverEngine) and engine.kv_pool.num_kv_heads == 1
        outs = engine.generate(prompts, params, progress=False)
        engine.reset_prefix_cache()  # reaches the worker too: their block managers stay identical
        # add_request/step/abort, as a server drives it: the abort reaches the worker too.
        keep = engine.add_request(prompts[0], SamplingParams(max_new_tokens=5, temperature=0.0, ignore_eos=True))
        gone = engine.add_request(prompts[1], SamplingParams(max_new_tokens=50, temperature=0.0, ignore_eos=True))
        engine.step()
        engine.abort(gone)
        finished = {}
        while engine.has_unfinished():
            for u in engine.step():
                if u.finished:
                    finished[u.request_id] = u.finish_reason
        result = {
            "engine": [o.samples[0].token_ids if o.samples else o.error for o in outs],
            "finished": [finished[keep], finished[gone]],
            "blocks_free_end": engine.kv_pool.blocks.num_free,
            "num_blocks": engine.kv_pool.num_blocks,
        }
        workers = engine._processes
        started = time.monotonic()
    result["shutdown_s"] = time.monotonic() - started
    result["worker_exitcodes"] = [p.exitcode for p in workers]
    result["group_destroyed"] = not dist.is_initialized()
    with open(out_json, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    (die_with_workers_running if sys.argv[3:] == ["die"] else main)(sys.argv[1], sys.argv[2])
