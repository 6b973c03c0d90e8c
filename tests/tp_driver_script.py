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


def lose_ranks(model_dir: str, out_json: str) -> None:
    """Two failures, one process: a worker rank killed while the engine idles (the next step must say so
    rather than wait on the group), then this driver killed with workers running (no shutdown runs: the
    workers must stop on their own). The test reads the JSON and watches the pids."""
    with start_tensor_parallel_engine(model_dir, 2, tokenizer=None, num_blocks=64, max_num_seqs=4) as engine:
        worker = engine._processes[0]
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(10)
        started = time.monotonic()
        try:
            engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=4), progress=False)
            error = None
        except RuntimeError as e:
            error = str(e)
        result = {"error": error, "raised_after_s": time.monotonic() - started}
    engine = start_tensor_parallel_engine(model_dir, 2, tokenizer=None, num_blocks=64, max_num_seqs=4)
    result["worker_pids"] = [p.pid for p in engine._processes]
    with open(out_json, "w") as f:
        json.dump(result, f)
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
    (lose_ranks if sys.argv[3:] == ["lose-ranks"] else main)(sys.argv[1], sys.argv[2])
