"""Tests of sac_glam_her.py: hindsight relabeling (Section 2.3), batch composition (Appendix E), torchrun,
checkpoint/resume and an end-to-end run.

The expected values are written by hand from the specification (the scripted episode's observations,
the social partner's descriptions, the n-step targets of Eq. 3 with n=3 and gamma=0.5, the goal-type
counts of the README), not computed by the code under test, so that each test can fail.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, _descendants  # shared fixtures: runner (script runs as subprocesses), tiny_dirs (tiny models)

import playground_text as pt
import sac_glam_her as sgh

State, Transition = sgh.State, sgh.Transition

# --------------------------------------------------------------------------------------------------
# 1. Relabeling a scripted episode of the real env
# --------------------------------------------------------------------------------------------------
OBJECTS = ["red door", "green water", "blue cat"]
GOAL = "Grow blue cat then grasp red door"
SCRIPT = ["Go to green water", "Grasp", "Go to blue cat", "Release", "Go to red door", "Grasp"]


def _obs(see, on="nothing", holding="nothing", grown="nothing"):
    return f"You see: {see}\nYou are on: {on}\nYou are holding: {holding}\nYou have grown: {grown}"


# o_0 .. o_6 and the possible actions in each, by hand.
ALL3 = "red door, green water, blue cat"
OBS = [
    _obs(ALL3),
    _obs(ALL3, on="green water"),
    _obs("red door, blue cat", holding="green water"),
    _obs("red door, blue cat", on="blue cat", holding="green water"),
    _obs(ALL3, on="green water", grown="blue cat"),  # the water was released on the cat: the agent is on the water
    _obs(ALL3, on="red door", grown="blue cat"),
    _obs("green water, blue cat", holding="red door", grown="blue cat"),
]
GO3 = ("Go to red door", "Go to green water", "Go to blue cat")
ACTIONS = [
    GO3,
    GO3 + ("Grasp",),
    ("Go to red door", "Go to blue cat", "Release"),
    ("Go to red door", "Go to blue cat", "Release"),
    GO3 + ("Grasp",),
    GO3 + ("Grasp",),
    ("Go to green water", "Go to blue cat", "Release"),
]
ACTION_INDEX = [1, 3, 1, 2, 0, 3]

# Hindsight goals by the step t' that first achieves them. Held out (test): "Grow <c> living_thing".
GRASP_WATER = ["Grasp green water", "Grasp green supply", "Grasp any water", "Grasp any supply", "Grasp any green thing"]
GROW_CAT_TRAIN = ["Grow blue cat", "Grow blue animal", "Grow any cat", "Grow any animal", "Grow any blue thing"]
GROW_CAT_TEST = ["Grow blue living_thing", "Grow any living_thing"]
GRASP_DOOR = ["Grasp red door", "Grasp red furniture", "Grasp any door", "Grasp any furniture", "Grasp any red thing"]
THEN_TRAIN = [f"{a} then g{b[1:]}" for a in GROW_CAT_TRAIN for b in GRASP_DOOR]  # 25, GOAL among them
THEN_TEST = [f"{a} then g{b[1:]}" for a in GROW_CAT_TEST for b in GRASP_DOOR]  # 10
TRAIN_FIRST = {**{g: 1 for g in GRASP_WATER}, **{g: 3 for g in GROW_CAT_TRAIN}, **{g: 5 for g in GRASP_DOOR + THEN_TRAIN}}
TEST_FIRST = {**{g: 3 for g in GROW_CAT_TEST}, **{g: 5 for g in THEN_TEST}}
TRAIN_GOALS, ALL_GOALS = set(pt.all_goals("train")), set(pt.all_goals("train")) | set(pt.all_goals("test"))

# (ret, discount, index of the next state's observation) of transitions t = 0..t' of a goal first achieved
# at t', with n = 3, gamma = 0.5: reward 1 at t' only, no bootstrap (discount 0) once t' is in the window.
EXPECTED_TARGETS = {
    0: [(1.0, 0.0, 1)],
    1: [(0.5, 0.0, 2), (1.0, 0.0, 2)],
    3: [(0.0, 0.125, 3), (0.25, 0.0, 4), (0.5, 0.0, 4), (1.0, 0.0, 4)],
    5: [(0.0, 0.125, 3), (0.0, 0.125, 4), (0.0, 0.125, 5), (0.25, 0.0, 6), (0.5, 0.0, 6), (1.0, 0.0, 6)],
}


def play(goal, objects=OBJECTS, script=SCRIPT):
    """The episode as the training loop keeps it: one Step per env step (real env, forced scene)."""
    env = pt.PlaygroundText(num_objects=len(objects))
    obs, info = env.reset(goal=goal, objects=objects)
    trajectory = []
    for action in script:
        state = State(goal, obs, tuple(info["possible_actions"]))
        obs, reward, terminated, truncated, info = env.step(action)
        next_state = State(goal, obs, tuple(info["possible_actions"]))
        trajectory.append(
            sgh.Step(
                state, state.actions.index(action), reward, next_state, terminated, truncated, tuple(info["achieved_goals"])
            )
        )
    return trajectory


def check_relabeled(goal, transitions, t_first, observations=OBS, actions=ACTIONS, action_index=ACTION_INDEX):
    assert len(transitions) == t_first + 1, goal  # steps t <= t' only
    for t, (tr, (ret, discount, nxt)) in enumerate(zip(transitions, EXPECTED_TARGETS[t_first])):
        assert tr.state == State(goal, observations[t], actions[t]), (goal, t)
        assert pt.format_prompt(tr.state.goal, tr.state.observation) == f"Goal: {goal}\n{observations[t]}\nAction:"
        assert tr.action == action_index[t], (goal, t)
        assert tr.next_state == State(goal, observations[nxt], actions[nxt]), (goal, t)
        assert (tr.ret, tr.discount) == pytest.approx((ret, discount), abs=1e-12), (goal, t)


def test_scripted_episode_is_as_written():
    trajectory = play(GOAL)
    assert [s.state.observation for s in trajectory] + [trajectory[-1].next_state.observation] == OBS
    assert [s.state.actions for s in trajectory] == ACTIONS[:6]
    assert [s.reward for s in trajectory] == [0, 0, 0, 0, 0, 1]
    assert [s.terminated for s in trajectory] == [False] * 5 + [True]
    first = {g: t for t, s in enumerate(trajectory) for g in s.achieved_goals}
    assert first == {**TRAIN_FIRST, **TEST_FIRST}


def test_relabel_future_strategy_train_goals_only():
    relabeled = sgh.relabel(play(GOAL), TRAIN_GOALS.__contains__, n_step=3, gamma=0.5)
    # The episode's own goal (achieved at t=5) is not relabeled: its real transitions are in the env buffer.
    assert GOAL not in relabeled
    assert set(relabeled) == set(TRAIN_FIRST) - {GOAL}
    assert len(relabeled) == 39
    for goal, transitions in relabeled.items():
        check_relabeled(goal, transitions, TRAIN_FIRST[goal])


def test_relabel_with_a_goal_set_holding_test_goals():
    relabeled = sgh.relabel(play(GOAL), ALL_GOALS.__contains__, n_step=3, gamma=0.5)
    assert set(relabeled) == (set(TRAIN_FIRST) | set(TEST_FIRST)) - {GOAL}
    assert len(relabeled) == 51
    for goal in GROW_CAT_TEST + THEN_TEST:
        check_relabeled(goal, relabeled[goal], TEST_FIRST[goal])


def test_relabel_truncated_episode_terminates_at_the_hindsight_goal():
    # Same script, own goal "Grasp any cow" never achieved: truncated at the horizon (grasp: 6 steps).
    trajectory = play("Grasp any cow")
    assert trajectory[-1].truncated and not trajectory[-1].terminated
    relabeled = sgh.relabel(trajectory, TRAIN_GOALS.__contains__, n_step=3, gamma=0.5)
    assert set(relabeled) == set(TRAIN_FIRST)  # now GOAL is a hindsight goal like the others
    check_relabeled(GOAL, relabeled[GOAL], 5)
    check_relabeled("Grasp any water", relabeled["Grasp any water"], 1)


def test_goal_achieved_at_the_first_step_gives_one_transition():
    # A fresh scene starts on nothing, so no env episode achieves a goal at t=0: a hand-made one.
    acts = (("Go to red door", "Grasp"), ("Go to red door", "Release"), ("Go to red door", "Grasp"))
    obs = ["o0", "o1", "o2", "o3"]
    own = "Grasp any cow"
    steps = [
        sgh.Step(
            State(own, obs[t], acts[t]),
            1,
            0.0,
            State(own, obs[t + 1], acts[t + 1] if t < 2 else acts[0]),
            False,
            t == 2,
            achieved,
        )
        for t, achieved in enumerate([("Grasp red door", "Grasp any door"), (), ("Grasp any door", "Grasp blue cat")])
    ]
    relabeled = sgh.relabel(steps, TRAIN_GOALS.__contains__, n_step=3, gamma=0.5)
    assert set(relabeled) == {"Grasp red door", "Grasp any door", "Grasp blue cat"}
    for goal in ("Grasp red door", "Grasp any door"):  # first achieved at t=0 (a repeat later does not count)
        assert relabeled[goal] == [Transition(State(goal, "o0", acts[0]), 1, 1.0, State(goal, "o1", acts[1]), 0.0)]
    returns = [(t.ret, t.discount) for t in relabeled["Grasp blue cat"]]
    assert len(returns) == 3
    for got, want in zip(returns, [(0.25, 0.0), (0.5, 0.0), (1.0, 0.0)]):  # pytest >= 9.1: approx takes no nested data
        assert got == pytest.approx(want)


def test_hindsight_goals_are_those_of_the_run_goal_types():
    simplified = set(pt.all_goals("train", ("grasp", "grow")))
    assert not any(pt.goal_type(g).startswith("grow_then") for g in simplified)
    # The scripted episode (Grow any cat) achieves sequential goals too: with the script's filter in the simplified
    # env (the training envs' relabels), only its grasp/grow goals relabel.
    keep = pt.vector_env(1, 0, num_objects=3, goal_types=("grasp", "grow")).relabels
    relabeled = sgh.relabel(play(GOAL), keep, n_step=3, gamma=0.5)
    assert set(relabeled) == {g for g in TRAIN_FIRST if pt.goal_type(g) in ("grasp", "grow")} - {GOAL}
    assert len(relabeled) < len(sgh.relabel(play(GOAL), TRAIN_GOALS.__contains__, n_step=3, gamma=0.5))


# --------------------------------------------------------------------------------------------------
# 2. torchrun, checkpoint/resume, end to end (tiny random model, CPU, gloo)
# --------------------------------------------------------------------------------------------------
SCRIPT = ROOT / "sac_glam_her.py"
# Runs the script as __main__ (as torchrun would), then saves what each rank trained.
WRAPPER = """
import os, runpy, sys, torch
script, out = sys.argv[1], sys.argv[2]
sys.argv = [script] + sys.argv[3:]
g = runpy.run_path(script, run_name="__main__")
state = {"trainable": g["trainable_state"](g["agent"]), "log_alpha": g["log_alpha"].detach().clone()}
torch.save(state, os.path.join(out, "rank%s.pt" % os.environ.get("RANK", "0")))
"""
# The simplified env of Appendix B (3 objects, grasp and grow): hindsight goals at almost every grasp.
COMMON = (
    "--no-cuda --no-bf16 --num-objects 3 --goal-types grasp grow --num-envs 4 --update-frequency 4 "
    "--learning-starts 16 --batch-size 8 --buffer-size 64 --log-frequency 16 --eval-frequency 0 "
    "--critic-warmup-updates 4 --critic-hidden 32 --lora-r 4 --update-chunk-size 4 --checkpoint-dir ck"
).split()


def ranks_of(checkpoint: dict) -> list[dict]:
    """Each rank's buffers and open episodes, rebuilt from the checkpoint as the script resumes."""
    out = []
    for mine in checkpoint["ranks"]:
        world, saved = checkpoint["world_size"], checkpoint["args"]
        rb, her = sgh.ReplayBuffer(saved["buffer_size"] // world), sgh.ReplayBuffer(saved["her_buffer_size"] // world)
        rb.data, rb.pos = mine["rb"]
        her.data, her.pos = mine["her"]
        out.append({"rb": rb, "her": her, "trajectories": mine["trajectories"]})
    return out


def rank_states(run, nproc: int) -> list[dict]:
    return [torch.load(run.cwd / f"rank{r}.pt") for r in range(nproc)]


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def runs(runner, tiny_dirs, tmp_path_factory):
    """Under torchrun (2 processes): a run to 96 steps, the same run stopped at 52 steps then resumed to 96.
    Alone: a longer run with a larger HER buffer and the default --bf16. The first three
    run side by side (their start-up, mostly imports, dominates)."""

    def start(key, args, nproc, cwd=None):
        if cwd is None:
            cwd = tmp_path_factory.mktemp(key)
            (cwd / "wrapper.py").write_text(WRAPPER)
        head = (
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
            if nproc > 1
            else [sys.executable]
        )
        return runner.start(key, [], cwd=cwd, cmd=head + [str(cwd / "wrapper.py"), str(SCRIPT), str(cwd), *args])

    model = ["--model-id", tiny_dirs["llama"]]
    ratio = model + COMMON + ["--her-buffer-size", "64"]
    full = start("her_full", ratio + ["--total-timesteps", "96"], 2)
    half = start("her_half", ratio + ["--total-timesteps", "52"], 2)
    default_precision = [a for a in COMMON if a != "--no-bf16"]  # --bf16 (default): bf16 where this CPU has it
    alone = start("her_alone", model + default_precision + ["--her-buffer-size", "5000", "--total-timesteps", "128"], 1)
    out = {"full": full.check(), "half": half.check(), "alone": alone.check()}
    out["full_states"], out["half_states"], out["half_checkpoint"] = (
        rank_states(full, 2),
        rank_states(half, 2),
        half.checkpoint(),
    )
    resumed = start(
        "her_resumed", ["--resume", str(half.checkpoint_dir()), "--total-timesteps", "96"], 2, cwd=half.cwd
    ).check()
    out["resumed"], out["resumed_states"] = resumed, rank_states(resumed, 2)
    return out


def assert_same(a, b):
    assert a["trainable"].keys() == b["trainable"].keys()
    for k in a["trainable"]:
        assert torch.equal(a["trainable"][k], b["trainable"][k]), k
    assert torch.equal(a["log_alpha"], b["log_alpha"])


def test_torchrun_ranks_hold_identical_parameters(runs):
    for run in ("full", "half", "resumed"):
        rank0, rank1 = runs[f"{run}_states"]
        assert_same(rank0, rank1)


def test_resume_equals_uninterrupted_run(runs):
    checkpoint = runs["half_checkpoint"]
    ranks = ranks_of(checkpoint)
    # The interruption falls where it matters: past the critic warm-up, HER buffer filled, episodes open.
    assert checkpoint["updates"] == 20 and checkpoint["global_step"] == 52
    assert all(len(r["her"]) > 0 for r in ranks) and any(len(t) for r in ranks for t in r["trajectories"])
    full, half, resumed = runs["full_states"][0], runs["half_states"][0], runs["resumed_states"][0]
    assert_same(resumed, full)
    # The final replay state is the uninterrupted run's too: both buffers and the open episodes.
    assert runs["resumed"].checkpoint_dir() == runs["half"].checkpoint_dir()  # the run continues under its own name
    for a, b in zip(ranks_of(runs["full"].checkpoint()), ranks_of(runs["resumed"].checkpoint())):
        assert a["rb"].data == b["rb"].data and a["her"].data == b["her"].data and a["her"].pos == b["her"].pos
        assert a["trajectories"] == b["trajectories"]
    # ... and the second half of the run did train the LLM adapters, the Q heads and alpha.
    changed = [k for k in full["trainable"] if not torch.equal(full["trainable"][k], half["trainable"][k])]
    assert any("lora" in k for k in changed) and any(k.startswith("qf.") for k in changed)
    assert not torch.equal(full["log_alpha"], half["log_alpha"])


def test_end_to_end_logs_and_her_buffer(runs):
    run = runs["full"]
    tags = scalars(run.run_dir())
    expected = {
        "charts/SPS",
        "charts/success_rate",
        "charts/success_rate_vs_seconds",
        "charts/episodic_length",
        "charts/success_rate_grasp",
        "charts/success_rate_grow",
        "losses/qf_loss",
        "losses/actor_loss",
        "losses/entropy",
        "losses/qf1_values",
        "losses/qf2_values",
        "losses/alpha",
        "charts/her_buffer_share",
        "charts/her_batch_share",
        "charts/hindsight_goals_per_episode",
    }
    assert expected <= set(tags), expected - set(tags)
    checkpoint = run.checkpoint()
    ranks = ranks_of(checkpoint)
    assert checkpoint["args"]["exp_name"] == "sac_glam_her" and "sac_glam_her" in checkpoint["run_name"]
    assert checkpoint["args"]["alpha"] == 0.05 and checkpoint["args"]["target_entropy"] == 0.01  # Table 3
    n_env, n_her = sum(len(r["rb"]) for r in ranks), sum(len(r["her"]) for r in ranks)
    assert n_her > 0
    # The last log is at the last step (96): the buffer share is the final checkpoint's.
    assert tags["charts/her_buffer_share"][-1] == (96, pytest.approx(n_her / (n_env + n_her)))
    assert tags["charts/her_batch_share"][-1] == (96, 0.5)  # 2 of 4 per rank (Table 3)
    assert max(v for _, v in tags["charts/hindsight_goals_per_episode"]) > 0
    for r in ranks:
        for t in r["her"].data:  # relabeled with training goals of the run's goal types
            assert t.state.goal in TRAIN_GOALS and t.next_state.goal == t.state.goal
            assert pt.goal_type(t.state.goal) in ("grasp", "grow")
        for trajectory in r["trajectories"]:  # open episodes: one goal, consecutive steps, not ended
            assert len({s.state.goal for s in trajectory}) <= 1
            assert all(a.next_state == b.state for a, b in zip(trajectory, trajectory[1:]))
            assert not any(s.terminated or s.truncated for s in trajectory)


def test_end_to_end_one_process_relabels_with_training_goals_only(runs):
    """One process, 128 steps: every batch after the first relabeled episode is half relabeled (Table 3), and no
    held-out goal nor a goal of a type outside --goal-types ever relabels."""
    run = runs["alone"]
    tags = scalars(run.run_dir())
    assert {v for _, v in tags["charts/her_batch_share"]} <= {0.0, 0.5} and tags["charts/her_batch_share"][-1][1] == 0.5
    (mine,) = ranks_of(run.checkpoint())
    goals = {t.state.goal for t in mine["her"].data}
    assert goals and goals <= set(pt.all_goals("train", ("grasp", "grow")))
    # Default --bf16: bf16 exactly where this CPU computes it natively (else fp32, said so), trained parameters fp32.
    precision = "bf16" if sgh.use_bf16(sgh.Args(), torch.device("cpu")) else "fp32, no native bf16 here"
    assert f"(decoder-only, {precision}) on cpu" in run.stdout.splitlines()[0]
    trainable = rank_states(run, 1)[0]["trainable"]
    assert trainable and {t.dtype for t in trainable.values()} == {torch.float32}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:  # the process ended meanwhile
        return ""


@pytest.mark.parametrize("who", ["all", "rank1"])
def test_sigterm_during_evaluation_under_torchrun_checkpoints_and_resumes(who, runner, tiny_dirs, tmp_path_factory):
    """torchrun forwards SIGTERM and kills its workers 30 s later; a scheduler may signal the workers too.
    A stop must not wait for a long evaluation (here ~100,000 episodes), the second SIGTERM a worker
    receives must not kill it before or during the save ("all"), and a signal that reaches one rank only
    must stop the other rank's evaluation too ("rank1")."""
    cwd = tmp_path_factory.mktemp(f"her_sigterm_{who}")
    (cwd / "wrapper.py").write_text(WRAPPER)
    args = list(COMMON)
    args[args.index("--eval-frequency") + 1] = "32"
    args += [
        "--model-id",
        tiny_dirs["llama"],
        "--her-buffer-size",
        "64",
        "--total-timesteps",
        "96",
        "--eval-episodes",
        "100000",
    ]
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    run = runner.start(f"her_sigterm_{who}", [], cwd=cwd, cmd=head + [str(cwd / "wrapper.py"), str(SCRIPT), str(cwd), *args])
    deadline = time.time() + 600
    while "evaluation at step 32" not in run.stdout:
        assert run.proc.poll() is None and time.time() < deadline, run.describe()
        time.sleep(0.05)
    time.sleep(1.0)  # well inside the evaluation
    workers = {}
    for pid in _descendants(run.proc.pid):
        cmdline = _cmdline(pid)
        if "wrapper.py" in cmdline:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            workers[int(next(e for e in env if e.startswith(b"RANK="))[5:])] = pid
    assert sorted(workers) == [0, 1], workers
    if who == "all":
        for pid in workers.values():  # the scheduler's SIGTERM to every process of the job ...
            os.kill(pid, signal.SIGTERM)
        run.proc.send_signal(signal.SIGTERM)  # ... and torchrun's, forwarded to its workers
    else:
        os.kill(workers[1], signal.SIGTERM)
    run.wait(timeout=time.time() - run.start_time + 120)  # the evaluation left would take minutes
    # With "all", torchrun itself exits with its SignalException (rc 1, its traceback); its workers end cleanly:
    assert run.stdout.count("stopped by signal") == 1 and "KeyboardInterrupt" not in run.stderr, run.describe()
    assert (cwd / "rank0.pt").exists() and (cwd / "rank1.pt").exists(), run.describe()  # written after main returned
    ck = run.checkpoint()
    assert (ck["global_step"], ck["world_size"]) == (32, 2) and len(ranks_of(ck)) == 2
    assert not [tag for tag in scalars(run.run_dir()) if tag.startswith("eval/")]  # the interrupted evaluation is not logged
    if who == "rank1":
        assert run.rc == 0, run.describe()
        return
    resumed = runner.start(
        "her_sigterm_resume",
        [],
        cwd=cwd,
        cmd=head
        + [str(cwd / "wrapper.py"), str(SCRIPT), str(cwd), "--resume", str(run.checkpoint_dir()), "--total-timesteps", "40"],
    ).check()
    assert resumed.checkpoint()["global_step"] == 40
    rank0, rank1 = rank_states(resumed, 2)
    assert_same(rank0, rank1)
