"""Two gloo processes: a failure on rank 1 (step, hook, data, evaluator) ends both with its message."""

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def test_a_failure_on_rank_1_reaches_rank_0():
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "engine_dist_script.py")]
    # a hang in a collective would run into the timeout; the script needs seconds
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    out = res.stdout
    assert res.returncode == 0, out[-3000:] + res.stderr[-3000:]
    assert "rank 1 step: ValueError: boom at iteration 3" in out
    assert "rank 0 step: PeerFailure: step: iteration 3: rank 1: ValueError: boom at iteration 3" in out
    assert "rank 1 hook: RuntimeError: hook failed after iteration 2" in out
    assert "rank 0 hook: PeerFailure: hook: iteration 3: rank 1: RuntimeError: hook failed after iteration 2" in out
    assert "rank 1 data: OSError: cannot read batch 4" in out
    assert "rank 0 data: PeerFailure: data: iteration 5: rank 1: OSError: cannot read batch 4" in out
    assert "rank 1 eval: KeyError: 'no labels'" in out
    assert "rank 0 eval: PeerFailure: eval: rank 1: KeyError: 'no labels'" in out
    assert "rank 0 clean: iter 12" in out and "rank 1 clean: iter 12" in out
