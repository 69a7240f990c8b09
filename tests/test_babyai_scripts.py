"""The env contract, proven on an env nobody here wrote: each script, copied with only its env import line changed
(as a researcher copies it), trains on BabyAI (examples/babyai_text.py over minigrid) with a tiny model built for
BabyAI's words, checkpoints, resumes exactly and evaluates its checkpoint; an env whose max_actions is too small
for --critic-input obs gets one clear line."""

from __future__ import annotations

import difflib
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT

pytest.importorskip("minigrid")
sys.path.insert(0, str(ROOT / "examples"))

import babyai_text  # noqa: E402
import tiny_models  # noqa: E402

ENV_IMPORT = "import playground_text as textenv"
LEVEL = ["--level", "BabyAI-GoToLocal-v0"]
COMMON = ["--no-cuda", "--no-bf16", "--num-envs", "4", "--eval-frequency", "0", "--log-frequency", "32", "--lora-r", "4"]
SAC = ["--update-frequency", "8", "--batch-size", "8", "--learning-starts", "64", "--critic-warmup-updates", "2"]
SAC += ["--critic-hidden", "16", "--checkpoint-frequency", "0", "--checkpoint-dir", "ck", "--eval-episodes", "4"]
PPO = ["--num-steps", "16", "--minibatch-size", "16", "--update-epochs", "1", "--checkpoint-dir", "ck", "--eval-episodes", "4"]
OPTIONS = {"sac_glam": SAC, "sac_glam_her": SAC + ["--her-buffer-size", "256"], "ppo_glam": PPO}


def copy_script(name: str, directory: Path, module: str = "babyai_text") -> Path:
    """The script with its env import pointed at `module`, nothing else changed."""
    source = (ROOT / f"{name}.py").read_text()
    line = next(line for line in source.splitlines() if line.startswith(ENV_IMPORT))
    copy = directory / f"{name}.py"
    copy.write_text(source.replace(line, f"import {module} as textenv"))
    return copy


@pytest.fixture(scope="module")
def babyai_model(tmp_path_factory) -> str:
    """A tiny random Llama on a word-level tokenizer of BabyAI-Text's words (tiny_models.words_of_env)."""
    words = tiny_models.words_of_env(babyai_text, episodes=20, level=LEVEL[1])
    tokenizer = tiny_models.make_env_tokenizer(words=words)
    return tiny_models.save_tiny_causal(tmp_path_factory.mktemp("babyai_model"), tokenizer=tokenizer)


def run(runner, key: str, script: Path, args: list) -> "object":
    cmd = [sys.executable, str(script), *map(str, args)]
    return runner.start(key, [], cwd=script.parent, cmd=cmd)


def test_copy_differs_by_the_import_line_only(tmp_path):
    for name in OPTIONS:
        diff = difflib.unified_diff(
            (ROOT / f"{name}.py").read_text().splitlines(), copy_script(name, tmp_path).read_text().splitlines(), n=0
        )
        changed = [line for line in diff if line[:1] in "+-" and line[:3] not in ("+++", "---")]
        assert len(changed) == 2 and changed[1] == "+import babyai_text as textenv", changed


@pytest.mark.parametrize("name", list(OPTIONS))
def test_script_trains_resumes_exactly_and_evaluates_on_babyai(name, runner, babyai_model, tmp_path_factory, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "examples"))  # the copy imports babyai_text from examples/
    base = [*COMMON, *OPTIONS[name], *LEVEL, "--model-id", babyai_model, "--exp-name", name]
    whole_dir, split_dir = tmp_path_factory.mktemp(f"{name}_whole"), tmp_path_factory.mktemp(f"{name}_split")
    whole = run(runner, f"babyai_{name}_whole", copy_script(name, whole_dir), base + ["--total-timesteps", 192])
    first = run(runner, f"babyai_{name}_first", copy_script(name, split_dir), base + ["--total-timesteps", 128])
    first.check()
    assert first.stdout.startswith("BabyAI__" + name), first.describe()  # the run name comes from the env module
    rest = run(
        runner, f"babyai_{name}_rest", split_dir / f"{name}.py", ["--resume", first.checkpoint_dir(), "--total-timesteps", 192]
    ).check()
    a, b = whole.check().checkpoint(), rest.checkpoint()
    assert a["global_step"] == b["global_step"] == 192 and a["updates"] == b["updates"] > 0
    assert a["args"]["env"] == {"level": LEVEL[1]}  # the env's own options, passed through and saved
    for k in a["trainable"]:
        assert torch.equal(a["trainable"][k], b["trainable"][k]), k
    ev = run(
        runner, f"babyai_{name}_eval", split_dir / f"{name}.py", ["--resume", rest.checkpoint_dir(), "--eval-only"]
    ).check()
    for split in babyai_text.SPLITS:
        assert f"success_rate_{split}_greedy: " in ev.stdout and f"success_rate_{split}_sampled: " in ev.stdout
    assert "Goal: go to" in ev.stdout  # the transcripts of greedy episodes, BabyAI prompts


BAD_ENV = '''"""BabyAI-Text, but claiming fewer action slots than its states offer (a broken env module)."""
from babyai_text import *  # noqa: F403
import babyai_text


def vector_env(*args, **kwargs):
    envs = babyai_text.vector_env(*args, **kwargs)
    envs.max_actions = 2
    return envs
'''


def test_critic_input_obs_with_more_actions_than_slots_is_one_clear_line(runner, babyai_model, tmp_path, monkeypatch):
    (tmp_path / "bad_env.py").write_text(BAD_ENV)
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "examples"))
    script = copy_script("sac_glam", tmp_path, module="bad_env")
    args = [*COMMON, *SAC, *LEVEL, "--model-id", babyai_model, "--total-timesteps", 64, "--critic-input", "obs"]
    bad = run(runner, "babyai_bad_slots", script, args).wait()
    assert bad.rc == 2 and "Traceback" not in bad.stderr, bad.describe()
    assert [line for line in bad.stderr.splitlines() if "error" in line.lower()] == [
        "error: --critic-input obs: a state offers 6 actions, more than the critic's 2 action slots (the env's "
        "max_actions): fix the env's max_actions, or use --critic-input obs-action"
    ], bad.describe()
