"""scripts/bench_peers.py: the peer runs clean up what DeepSpeed's CPU backend leaves in
shared memory (its allreduce buffers, 64 MiB each, outlive its processes)."""
import importlib.util
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))
_spec = importlib.util.spec_from_file_location("bench_peers", SCRIPTS / "bench_peers.py")
bp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bp)


def test_removes_only_the_runs_own_buffers(tmp_path):
    mine = [f"deepspeed_allreduce_buffer_{r}_127.0.0.1_41234_{i}" for r in (0, 1) for i in range(4)]
    others = ["deepspeed_allreduce_buffer_0_127.0.0.1_41235_0",  # another run's port
              "deepspeed_allreduce_buffer_0_127.0.0.1_141234_0",  # a port that ends in ours
              "torch_shm_41234_0", "unrelated"]
    for name in mine + others:
        (tmp_path / name).write_bytes(b"x")
    gone = bp.remove_deepspeed_shm(41234, tmp_path)
    assert sorted(gone) == sorted(mine)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(others)
    assert bp.remove_deepspeed_shm(41234, tmp_path) == []
