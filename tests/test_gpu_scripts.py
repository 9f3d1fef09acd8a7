"""The GPU-only scripts, checked on CPU: scripts/gpu_check.sh parses and refuses cleanly
without a GPU; the fused_moe tuner's candidate grids are valid tile pairs.

    python -m pytest tests/test_gpu_scripts.py -q
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import tune_fused_moe  # noqa: E402


def test_gpu_check_script_parses_and_needs_a_gpu(tmp_path):
    script = ROOT / "scripts" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the script would run the whole check")
    proc = subprocess.run(["bash", str(script), str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 1
    assert "no CUDA GPU visible" in (tmp_path / "out" / "summary.md").read_text()


@pytest.mark.parametrize("grid", ["quick", "full"])
@pytest.mark.parametrize("T,top_k,E", [(1, 2, 64), (4096, 2, 64), (8, 1, 8)])
def test_tuner_candidates(grid, T, top_k, E):
    F = 9472
    firsts = list(tune_fused_moe.gemm1_candidates(T, top_k, E, grid))
    assert firsts and len(set(firsts)) == len(firsts)
    assert all(c.gemm2 is not None and c.gemm2.BLOCK_M == c.BLOCK_M for c in firsts)
    pairs = list(tune_fused_moe.gemm2_candidates(firsts[0], T, top_k, E, F, grid))
    assert pairs and len(set(pairs)) == len(pairs)
    for c in pairs:  # GEMM1 kept, GEMM2 its own, within shared memory
        assert c.BLOCK_N == firsts[0].BLOCK_N and c.for_gemm2().BLOCK_M == c.BLOCK_M
        g2 = c.for_gemm2()
        assert tune_fused_moe._fits(g2.BLOCK_M, g2.BLOCK_N, g2.BLOCK_K, g2.num_stages, 1)
    splits = {c.for_gemm2().SPLIT_K for c in pairs}
    decode = T * top_k <= 4 * E
    assert (max(splits) > 1) == (decode or grid == "full")
    if grid == "full":  # the wide grid holds the quick one's tile shapes
        quick = {(c.BLOCK_M, c.BLOCK_N, c.BLOCK_K)
                 for c in tune_fused_moe.gemm1_candidates(T, top_k, E, "quick")}
        assert quick <= {(c.BLOCK_M, c.BLOCK_N, c.BLOCK_K) for c in firsts}


def test_tuner_without_gpu_says_so(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert tune_fused_moe.main(["--tokens", "1"]) == 0
    assert "needs a CUDA GPU" in capsys.readouterr().out


def test_bench_attention_without_gpu_says_so(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    import bench_attention

    assert bench_attention.main([]) == 0
    assert "needs a CUDA GPU" in capsys.readouterr().out
