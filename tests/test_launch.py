"""The launch recipes as users run them: two torchrun agents on this machine stand for two
nodes (loopback), the pipeline split across them, and the tokens equal one process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_layouts import free_port

LAUNCH = Path(__file__).resolve().parents[1] / "launch"
PROMPTS = ["--prompt-ids", "3,1,4,1,5", "--prompt-ids", "9,2,6"]


def one_process(path) -> list:
    p = subprocess.run([sys.executable, "-m", "moerun.generate", "--model", str(path), *PROMPTS,
                        "--max-new-tokens", "6", "--ignore-eos", "--json"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def two_nodes(script: str, env_of, args) -> list[subprocess.CompletedProcess]:
    """Run ``script`` once per 'node' at the same time; each gets env_of(node_rank)."""
    bin_dir = str(Path(sys.executable).parent)  # the recipes call torchrun from PATH
    procs = [subprocess.Popen(["bash", str(LAUNCH / script), "generate", *args],
                              env={**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"], "NNODES": "2",
                                   "NPROC": "1", **env_of(n)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in range(2)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=240)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


@pytest.mark.parametrize("script", ["multi_node.sh", "multi_node_c10d.sh"])
def test_two_nodes_with_the_pipeline_across_them(script, hf_checkpoint):
    path, _ = hf_checkpoint("mixtral")
    port = free_port()
    if script == "multi_node.sh":
        env_of = lambda n: {"NODE_RANK": str(n), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # noqa: E731
    else:
        env_of = lambda n: {"RDZV_ENDPOINT": f"127.0.0.1:{port}", "RDZV_ID": f"t{port}"}  # noqa: E731
    args = ["--model", str(path), "--pp", "2", *PROMPTS, "--max-new-tokens", "6", "--ignore-eos", "--json",
            "--timeout", "60"]
    runs = two_nodes(script, env_of, args)
    assert [r.returncode for r in runs] == [0, 0], [r.stderr[-2000:] for r in runs]
    printed = [r.stdout.strip() for r in runs if r.stdout.strip()]
    assert len(printed) == 1  # global rank 0 prints, on one node
    if script == "multi_node.sh":
        assert runs[0].stdout.strip(), "static ranks put global rank 0 on NODE_RANK 0"
    assert json.loads(printed[0].splitlines()[-1]) == one_process(path)


def test_recipes_parse():
    for f in ["single_node.sh", "multi_node.sh", "multi_node_c10d.sh", "slurm.sbatch"]:
        p = subprocess.run(["bash", "-n", str(LAUNCH / f)], capture_output=True, text=True)
        assert p.returncode == 0, (f, p.stderr)
    p = subprocess.run(["bash", str(LAUNCH / "multi_node.sh"), "generate"], capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if k not in ("NNODES", "NODE_RANK", "MASTER_ADDR")})
    assert p.returncode != 0 and "set NNODES" in p.stderr  # a missing setting is named


def test_moerun_help_and_unknown_command():
    p = subprocess.run([sys.executable, "-m", "moerun.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "serve" in p.stdout and "generate" in p.stdout
    p = subprocess.run([sys.executable, "-m", "moerun.cli", "frob"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "unknown command 'frob'" in p.stderr


def test_deepspeed_moe_layer_computes_what_moerun_does(tmp_path):
    """The peer section's worker at EP 2 (skips where DeepSpeed is not installed, as in CI)."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "peer.json"
    worker = Path(__file__).resolve().parents[1] / "scripts" / "peer_deepspeed.py"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={free_port()}", str(worker), str(out), "--iters", "1"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "LOCAL_SIZE": "2"})
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads(out.read_text())
    assert got["max_abs_diff"] <= 1e-5 and got["max_abs_output"] > 0.1


def _autoep_usable() -> str:
    """Why AutoEP cannot run here ('' when it can): DeepSpeed missing, or a transformers whose
    output-capture registry DeepSpeed 0.19.8's AutoEP does not understand (5.23 on)."""
    try:
        import deepspeed  # noqa: F401  (only whether it is installed)
        from transformers.utils import output_capturing
    except ImportError as e:
        return f"needs deepspeed and transformers 5 ({e})"
    if type(output_capturing._CAN_RECORD_REGISTRY) is not dict:
        return "this transformers' output-capture registry is not a dict: AutoEP needs transformers < 5.23"
    return ""


AUTOEP_MISSING = _autoep_usable()


@pytest.mark.skipif(bool(AUTOEP_MISSING), reason=AUTOEP_MISSING or "usable")
def test_deepspeed_autoep_generates_what_moerun_does(tmp_path):
    """AutoEP end to end at EP 2 on a small Mixtral checkpoint: every greedy output equals
    moerun's (skips where DeepSpeed is not installed, as in CI)."""
    from moerun.build import build_model
    from moerun.config import ModelConfig
    from moerun.weights import save_checkpoint
    cfg = ModelConfig.load("tiny").replace(num_layers=2, moe_layers=(), sliding_windows=(), num_experts=8)
    save_checkpoint(build_model("tiny", cfg=cfg, dtype=torch.float32, device="cpu", seed=3), tmp_path / "ckpt")
    out = tmp_path / "autoep.json"
    worker = Path(__file__).resolve().parents[1] / "scripts" / "peer_autoep.py"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={free_port()}", str(worker), str(tmp_path / "ckpt"), str(out),
                        "--prompts", "4", "--new-tokens", "6"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads(out.read_text())
    assert got["ep"] == 2 and got["same"] == got["prompts"] == 4, got["notes"]
