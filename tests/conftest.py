"""Shared fixtures for the sac_glam.py tests: tiny offline models saved once, and script runs.

Script runs are subprocesses (`python sac_glam.py ...` with the repository root on PYTHONPATH and a
temporary directory as cwd, so runs/ and checkpoints/ land there). A run is started once per session
under a key and can be shared by several tests; tests start every run they need before waiting on
any, so independent runs overlap on the two cores.
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "sac_glam.py"
for p in (str(ROOT), str(ROOT / "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)

RUN_TIMEOUT = 900  # seconds per subprocess; a run that hangs (e.g. a collective deadlock) fails the test


def script_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    # One thread per process: on a 2-core machine shared with other processes, torch's default
    # thread pool makes a tiny-model update 10-50x slower (spin-waiting threads), and the tests
    # overlap two runs at a time. Results do not depend on the thread count.
    env["OMP_NUM_THREADS"] = "1"
    env["HF_HUB_OFFLINE"] = "1"  # nothing may be downloaded; fail fast instead of retrying the hub
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def _descendants(root: int) -> list[int]:
    """Process ids below `root` in the process tree (Linux /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for entry in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(entry) as f:
                stat = f.read()
        except OSError:
            continue
        pid, ppid = int(stat.split(" ", 1)[0]), int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


class Run:
    """One subprocess with stdout/stderr in files (no pipe can fill up while another run is waited on)."""

    def __init__(self, key: str, cmd: list[str], cwd: Path):
        self.key, self.cmd, self.cwd = key, cmd, cwd
        self.out_path, self.err_path = cwd / f"{key}.stdout", cwd / f"{key}.stderr"
        self._out, self._err = open(self.out_path, "w"), open(self.err_path, "w")
        self.start_time = time.time()
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=script_env(), stdout=self._out, stderr=self._err)
        self.rc = None

    def wait(self, timeout: float = RUN_TIMEOUT) -> "Run":
        """Wait until the run ends, or kill it once `timeout` seconds have passed since it started."""
        if self.rc is None:
            try:
                self.rc = self.proc.wait(timeout=max(1.0, timeout - (time.time() - self.start_time)))
            except subprocess.TimeoutExpired:
                self.kill()
                self.rc = "timeout"
            self._out.close()
            self._err.close()
            self.seconds = time.time() - self.start_time
        return self

    def kill(self):
        """Kill this run's process and all its descendants (torchrun puts its workers in new sessions)."""
        for pid in [self.proc.pid, *_descendants(self.proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()

    @property
    def stdout(self) -> str:
        return self.out_path.read_text()

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def describe(self) -> str:
        return f"{self.key}: rc={self.rc}\ncmd: {' '.join(map(str, self.cmd))}\n--- stdout\n{self.stdout[-3000:]}\n--- stderr\n{self.stderr[-5000:]}"

    def check(self) -> "Run":
        self.wait()
        assert self.rc == 0, self.describe()
        return self

    def checkpoint_dirs(self) -> list[Path]:
        return sorted(Path(p).parent for p in glob.glob(str(self.cwd / "ck" / "*" / "checkpoint.pt")))

    def checkpoint_dir(self) -> Path:
        dirs = self.checkpoint_dirs()
        assert len(dirs) == 1, f"expected one checkpoint dir under {self.cwd / 'ck'}, got {dirs}\n{self.describe()}"
        return dirs[0]

    def checkpoint(self) -> dict:
        """The run's checkpoint, read as the scripts read it (torch's safe loader: tensors, plain data and the scripts'
        named tuples, which a script run as __main__ pickles as __main__.State, ...)."""
        import torch

        import sac_glam_her  # its records, State, Transition and Step, are every script's

        records = [(cls, f"__main__.{cls.__name__}") for cls in sac_glam_her.CHECKPOINT_RECORDS]
        with torch.serialization.safe_globals(records):
            return torch.load(self.checkpoint_dir() / "checkpoint.pt", weights_only=True, map_location="cpu")

    def run_dir(self) -> Path:
        dirs = glob.glob(str(self.cwd / "runs" / "*"))
        assert len(dirs) == 1, f"expected one TensorBoard run dir under {self.cwd / 'runs'}, got {dirs}"
        return Path(dirs[0])


class Runner:
    def __init__(self, tmp_factory):
        self.tmp_factory = tmp_factory
        self.runs: dict[str, Run] = {}

    def start(self, key: str, args: list[str], cwd: Path | None = None, cmd: list[str] | None = None) -> Run:
        """Start `python sac_glam.py *args` (or `cmd`) once per session under `key`; return the Run."""
        if key not in self.runs:
            cwd = cwd if cwd is not None else self.tmp_factory.mktemp(key)
            cmd = cmd if cmd is not None else [sys.executable, str(SCRIPT), *map(str, args)]
            self.runs[key] = Run(key, cmd, cwd)
        return self.runs[key]

    def close(self):
        for run in self.runs.values():
            if run.rc is None:
                run.kill()
                run.wait()


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, str]:
    """The tiny random Llama and T5 (with their offline tokenizers), saved once per session; "llama_actions"
    is the Llama on the tokenizer with one token per "Go to" action (benchmarks/learning_curves.py)."""
    import tiny_models  # transformers is imported only by the tests that need a model

    base = tmp_path_factory.mktemp("tiny_models")
    return {
        "llama": tiny_models.save_tiny_causal(base / "llama"),
        "llama_actions": tiny_models.save_tiny_causal(
            base / "llama_actions", tokenizer=tiny_models.make_env_tokenizer(action_tokens=True)
        ),
        "t5": tiny_models.save_tiny_t5(base / "t5"),
        "t5_tied": save_tiny_t5_tied(base / "t5_tied"),
    }


def save_tiny_t5_tied(path) -> str:
    """A tiny original-T5-like model: tied embeddings, so the decoder output is rescaled by d_model^-0.5
    before the LM head (`scale_decoder_outputs`), the path Flan-T5 (untied) does not take."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    import tiny_models

    tok = tiny_models.make_env_tokenizer(append_eos=True)
    config = T5Config(
        vocab_size=len(tok),
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        feed_forward_proj="relu",
        dropout_rate=0.0,
        initializer_factor=0.05,
        pad_token_id=tok.pad_token_id,
        decoder_start_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    assert config.scale_decoder_outputs
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def runner(tmp_path_factory):
    r = Runner(tmp_path_factory)
    yield r
    r.close()


def nonzero_lora(llm, seed: int = 1, scale: float = 0.05):
    """Give the LoRA B matrices (zero at init) random values, so that the adapters change the outputs and the
    LoRA path is part of what a scoring test compares."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in llm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return llm


@pytest.fixture
def one_thread():
    """In-process model tests run on one thread: steadier under load, and the numbers do not change."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
