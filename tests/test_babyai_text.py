"""Tests of examples/babyai_text.py: its social partner against minigrid's own verifier, its text, splits and
checkpoints.

The reference is minigrid itself: for every mission a level's generator could word about a layout, a
GoToInstr / PickupInstr built with minigrid's classes and verified at each step as RoomGridLevel.step does. The
level grammars and the held-out pairs below are written from minigrid's level code and the module's docstring,
not read back from the module.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("minigrid")

ROOT = Path(__file__).resolve().parents[1]
for p in (str(ROOT), str(ROOT / "examples")):
    if p not in sys.path:
        sys.path.insert(0, p)

import gymnasium as gym  # noqa: E402
from minigrid.core.constants import COLOR_NAMES, OBJECT_TO_IDX, COLOR_TO_IDX  # noqa: E402
from minigrid.core.grid import Grid  # noqa: E402
from minigrid.core.world_object import Ball, Box, Door, Key  # noqa: E402
from minigrid.envs.babyai.core.verifier import LOC_NAMES, GoToInstr, ObjDesc, PickupInstr  # noqa: E402

import babyai_text as bt  # noqa: E402

ACTIONS = ["turn left", "turn right", "go forward", "pick up", "drop", "toggle"]
HELD_OUT_PAIRS = {("red", "ball"), ("green", "key"), ("blue", "box"), ("purple", "ball"), ("yellow", "key"), ("grey", "box")}
# Per level, from its gen_mission: the instruction, which (type given, color given) ObjDescs it draws, and whether
# it draws locations (LevelGen's rand_obj with locations=True).
BOTH = [(True, True)]
GRAMMARS = {
    "BabyAI-GoToObj-v0": (GoToInstr, BOTH, False),
    "BabyAI-GoToLocal-v0": (GoToInstr, BOTH, False),
    "BabyAI-GoTo-v0": (GoToInstr, BOTH, False),
    "BabyAI-Pickup-v0": (PickupInstr, BOTH, False),
    "BabyAI-PickupDist-v0": (PickupInstr, [(True, True), (True, False), (False, True)], False),
    "BabyAI-PickupDistDebug-v0": (PickupInstr, [(True, True), (True, False), (False, True)], False),
    "BabyAI-PickupLoc-v0": (PickupInstr, [(True, True), (True, False)], True),
}
SMALL_LEVELS = [
    "BabyAI-GoToObj-v0",
    "BabyAI-GoToLocal-v0",
    "BabyAI-PickupDist-v0",
    "BabyAI-PickupDistDebug-v0",
    "BabyAI-PickupLoc-v0",
]


def held_out(mission: str) -> bool:
    return any(f"{c} {t}" in mission for c, t in HELD_OUT_PAIRS)


def reference_verifiers(env, level: str) -> dict:
    """mission -> minigrid instruction, reset on the fresh layout, for every mission the level could generate here."""
    instr_class, patterns, locations = GRAMMARS[level]
    out = {}
    for kind in ("ball", "box", "key", None):
        for color in [*COLOR_NAMES, None]:
            if (kind is not None, color is not None) not in patterns:
                continue
            for loc in [None, *LOC_NAMES] if locations else [None]:
                desc = ObjDesc(kind, color, loc)
                if not desc.find_matching_objs(env)[0]:
                    continue  # the generator only describes objects of the layout
                instr = instr_class(desc)
                mission = instr.surface(env)
                instr.reset_verifier(env)
                out[mission] = instr
    return out


def matches(mission: str, color: str, kind: str) -> bool:
    """Does a pick-up mission without location describe this object? ("pick up a red object", "pick up the ball")"""
    words = mission.split(" ")[3:]
    return words in ([color, kind], [color, "object"], [kind])


def random_episode(env: bt.BabyAIText, level: str, rng: random.Random) -> dict:
    """One random-action episode, checked step by step against minigrid's verifiers; returns some counts."""
    obs, info = env.reset()
    mg = env.minigrid
    refs = reference_verifiers(mg, level)
    goal = info["goal"]
    assert goal == mg.mission and goal in refs, (goal, sorted(refs))
    assert info["possible_actions"] == ACTIONS and held_out(goal) == (env.split == "test")
    ever = set()
    counts = {"steps": 0, "achieved": 0, "success": 0, "failure": 0}
    while True:
        action = rng.choice(ACTIONS)
        index = ACTIONS.index(action)
        carried_before = mg.carrying
        obs, reward, terminated, truncated, info = env.step(action)
        if index == 4:  # RoomGridLevel.step: positions are re-read after a drop, then the instruction verified
            for instr in refs.values():
                instr.update_objs_poss()
        status = {m: instr.verify(index) for m, instr in refs.items()}
        accepted = {m for m, s in status.items() if s == "success"}
        achieved = info["achieved_goals"]
        assert len(achieved) == len(set(achieved))
        assert set(achieved) == accepted - ever, (level, counts["steps"], achieved, accepted - ever)
        ever |= accepted
        success = status[goal] == "success"
        assert info["success"] is success and (reward == 1.0) is success and (goal in achieved) is success
        assert reward in (0.0, 1.0)
        # Strict PickupDistDebug: a pickup of anything the mission does not describe ends the episode in failure.
        wrong = level.endswith("Debug-v0") and index == 3 and carried_before is None and mg.carrying and not success
        assert terminated == (success or bool(wrong))
        assert truncated == (not terminated and mg.step_count >= mg.max_steps)
        assert info["goal"] == goal and info["possible_actions"] == ACTIONS
        assert all(env.relabels(m) == (not held_out(m)) for m in achieved)
        if env.grammar.verb == "pick up" and achieved:
            assert all(
                matches(m, mg.carrying.color, mg.carrying.type) for m in achieved if not m.endswith("you") and "your" not in m
            )
        counts["steps"] += 1
        counts["achieved"] += len(achieved)
        counts["success"] += success
        counts["failure"] += bool(wrong)
        if terminated or truncated:
            return counts


# --------------------------------------------------------------------------------------------------
# 1. The social partner is minigrid's verifier, over many random episodes
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("level", SMALL_LEVELS)
def test_partner_matches_minigrid_verifier(level):
    rng = random.Random(level)
    totals = {"steps": 0, "achieved": 0, "success": 0, "failure": 0}
    for split, seed in (("train", 1), ("test", 2)):
        env = bt.BabyAIText(level, split, seed=seed)
        for _ in range(35 if split == "train" else 25):
            for key, n in random_episode(env, level, rng).items():
                totals[key] += n
    # The check saw what it is about: hindsight descriptions (GoToObj's one object: its mission only), successes,
    # and failures where the level has them.
    assert totals["achieved"] > (totals["success"] if level == "BabyAI-GoToObj-v0" else 50) - 1, totals
    assert totals["success"] >= 3, totals
    assert (totals["failure"] > 0) == level.endswith("Debug-v0"), totals


@pytest.mark.parametrize("level", ["BabyAI-GoTo-v0", "BabyAI-Pickup-v0"])
def test_partner_matches_minigrid_verifier_in_mazes(level):
    """The 3x3-room levels: "a"/"the" counts objects of every room; 576-step episodes, so fewer of them."""
    rng = random.Random(level)
    env = bt.BabyAIText(level, "train", seed=3)
    achieved = sum(random_episode(env, level, rng)["achieved"] for _ in range(4))
    assert achieved > 0


def walk_to_an_object(level: str):
    """Turn and walk at random until the agent faces an object (minigrid starts it two cells or more from any), one
    that the mission does not describe: (env, object, reference verifiers reset and verified as the env, last info)."""
    rng = random.Random(0)
    for seed in range(100):
        env = bt.BabyAIText(level, seed=seed)
        env.reset()
        mg = env.minigrid
        refs = reference_verifiers(mg, level)
        for _ in range(30):
            action = rng.choice(ACTIONS[:3])
            _, _, terminated, _, info = env.step(action)
            for instr in refs.values():
                instr.verify(ACTIONS.index(action))
            obj = mg.grid.get(*mg.front_pos)
            if terminated or (obj is not None and obj.type != "wall"):
                break
            assert info["achieved_goals"] == []
        if not terminated and obj is not None and obj.type != "wall" and not matches(env.goal, obj.color, obj.type):
            return env, obj, refs, info
    pytest.fail(f"no {level} layout where a short walk faces an object")


def count(env, kind=None, color=None) -> int:
    """Cells of the layout of this type and color (None: any; walls count, as in minigrid's ObjDesc)."""
    return sum(1 for c in env.minigrid.grid.grid if c and kind in (None, c.type) and color in (None, c.color))


def the(n: int) -> str:
    return "the" if n == 1 else "a"


def test_scripted_goto():
    """Facing an object achieves going to it, once; after a pickup minigrid's verifier still accepts its emptied
    cell (the position it recorded), which the partner need not say again: it was achieved before."""
    env, obj, refs, info = walk_to_an_object("BabyAI-GoToLocal-v0")
    mission = f"go to {the(count(env, obj.type, obj.color))} {obj.color} {obj.type}"
    assert info["achieved_goals"] == [mission] and not info["success"] and mission != env.goal
    for action, index in (("pick up", 3), ("turn right", 1), ("turn left", 0)):
        _, reward, terminated, _, info = env.step(action)
        statuses = {m: instr.verify(index) for m, instr in refs.items()}
        assert info["achieved_goals"] == [] and reward == 0.0 and not terminated
    assert env.minigrid.carrying is obj and env.minigrid.grid.get(*env.minigrid.front_pos) is None
    assert statuses[mission] == "success"  # the stale position: the cell is empty


def test_scripted_pickup():
    """PickupDist words an object by type and color, type alone, color alone ("a grey object" always: grey walls)."""
    env, obj, _, _ = walk_to_an_object("BabyAI-PickupDist-v0")
    expected = [
        f"pick up {the(count(env, obj.type, obj.color))} {obj.color} {obj.type}",
        f"pick up {the(count(env, obj.type))} {obj.type}",
        f"pick up {the(count(env, None, obj.color))} {obj.color} object",
    ]
    assert count(env, None, "grey") > 20
    _, reward, terminated, _, info = env.step("pick up")
    assert info["achieved_goals"] == expected and reward == 0.0 and not terminated
    assert env.step("drop")[4]["achieved_goals"] == [] and env.step("pick up")[4]["achieved_goals"] == []  # once only
    assert env.minigrid.carrying is obj


# --------------------------------------------------------------------------------------------------
# 2. Failure is not success
# --------------------------------------------------------------------------------------------------
def test_wrong_pickup_terminates_in_failure():
    """PickupDistDebug (strict): the first pickup of an object the mission does not describe ends the episode with
    reward 0, success False; the vector env then starts the next episode."""
    envs = bt.vector_env(1, seed=5, level="BabyAI-PickupDistDebug-v0")
    rng = random.Random(0)
    envs.reset()
    mg = envs.envs[0].minigrid
    for _ in range(3000):
        goal = envs.envs[0].goal
        _, rewards, terminated, truncated, infos = envs.step([rng.choice(ACTIONS)])
        final = infos[0].get("final_info")
        if terminated[0] and not final["success"]:
            break
    else:
        pytest.fail("no failure in 3000 random steps")
    assert rewards[0] == 0.0 and not truncated[0] and goal not in final["achieved_goals"]
    carried = infos[0]["final_observation"].split("\n")[-1]  # "You carry a <color> <type>"
    assert carried.startswith("You carry a ") and not matches(goal, *carried.split(" ")[3:])
    assert "final_info" not in final and infos[0]["goal"] == mg.mission


def test_success_at_the_time_limit_is_terminated_with_reward_1():
    """minigrid ends such a step both terminated and truncated, with its reward 1 - 0.9 = 0.1: here terminated only,
    reward 1.0. GoToObj with its object two cells ahead; the limit cut to one step."""
    for seed in range(300):
        env = bt.BabyAIText("BabyAI-GoToObj-v0", seed=seed)
        env.reset()
        mg = env.minigrid
        ahead = mg.front_pos + (mg.front_pos - mg.agent_pos)
        if mg.grid.get(*mg.front_pos) is None and mg.grid.get(*ahead) is not None and mg.grid.get(*ahead).type != "wall":
            break
    else:
        pytest.fail("no GoToObj layout with the object two cells ahead")
    mg.max_steps = 1
    _, reward, terminated, truncated, info = env.step("go forward")
    assert (reward, terminated, truncated, info["success"], info["achieved_goals"]) == (1.0, True, False, True, [env.goal])


# --------------------------------------------------------------------------------------------------
# 3. Checkpoints
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("level", ["BabyAI-GoToLocal-v0", "BabyAI-PickupLoc-v0"])
def test_state_dict_round_trip(level):
    rng = random.Random(1)
    envs = bt.vector_env(3, seed=11, first_index=2, stream=1, level=level)
    envs.reset()
    ended = 0
    while ended < 2 or rng.random() < 0.5:  # stop mid-episode, after auto-resets
        _, _, terminated, truncated, _ = envs.step([rng.choice(ACTIONS) for _ in range(3)])
        ended += int((terminated | truncated).sum())
    state = json.loads(json.dumps(envs.state_dict()))  # plain data: JSON keeps it whole
    assert state == envs.state_dict()
    other = bt.vector_env(3, seed=999, level=level)  # different seeds: everything must come from the state
    other.load_state_dict(state)
    assert other.state_dict() == state
    ended = 0
    for _ in range(150):  # past at least one more auto-reset of every env (64-step limit)
        actions = [rng.choice(ACTIONS) for _ in range(3)]
        a, b = envs.step(actions), other.step(actions)
        assert a[0] == b[0] and a[4] == b[4]
        for x, y in zip(a[1:4], b[1:4]):
            np.testing.assert_array_equal(x, y)
        ended += int((a[2] | a[3]).sum())
    assert ended >= 3


def test_state_before_reset_and_wrong_level():
    envs = bt.vector_env(2, seed=0)
    state = envs.state_dict()
    assert [s["episode"] for s in state] == [None, None]
    other = bt.vector_env(2, seed=0)
    other.load_state_dict(state)
    assert other.reset() == envs.reset()
    with pytest.raises(ValueError, match="options it was saved with"):
        bt.vector_env(2, seed=0, level="BabyAI-PickupLoc-v0").load_state_dict(state)
    with pytest.raises(ValueError, match="states of 2 envs for 3"):
        bt.vector_env(3, seed=0).load_state_dict(state)


# --------------------------------------------------------------------------------------------------
# 4. Splits and seeds
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("level", SMALL_LEVELS)
def test_split_rule(level):
    seen = {}
    for split in ("train", "test"):
        env = bt.BabyAIText(level, split, seed=7)
        seen[split] = {env.reset()[1]["goal"] for _ in range(150)}
        assert all(held_out(g) == (split == "test") for g in seen[split])
        assert all(env.relabels(g) == (split == "train") for g in seen[split])
    assert len(seen["test"]) >= 4 and len(seen["train"]) >= 10
    verb = "go to" if "GoTo" in level else "pick up"
    assert all(bt.goal_type(g) == verb.replace(" ", "_") for s in seen.values() for g in s)
    assert set(bt.all_missions(level, "train")) >= seen["train"] and set(bt.all_missions(level, "test")) >= seen["test"]
    env = bt.vector_env(1, seed=0, level=level)
    other = "pick up the red key" if verb == "go to" else "go to the red key"
    assert not env.relabels(other) and not env.relabels("go to the purple ball") and not env.relabels("pick up the blue box")


def test_splits_of_mission_forms():
    # Held out: the pair named, whatever the rest says; a color or a type alone is a training mission.
    assert held_out("pick up the red ball on your left") and bt.is_held_out("pick up the red ball on your left")
    for mission in ("pick up a red object", "pick up the ball", "go to a red key", "pick up a grey object"):
        assert not bt.is_held_out(mission)
    env = bt.vector_env(1, seed=0, level="BabyAI-PickupDist-v0")
    assert (
        env.relabels("pick up a red object") and env.relabels("pick up the ball") and not env.relabels("pick up the red ball")
    )
    assert not bt.vector_env(1, seed=0, level="BabyAI-GoToLocal-v0").relabels("go to the ball")  # not GoToLocal's form
    loc = bt.vector_env(1, seed=0, level="BabyAI-PickupLoc-v0")
    assert loc.relabels("pick up a key behind you") and not loc.relabels("pick up a red object")


def test_envs_do_not_depend_on_the_process_count():
    """Env 3 of a run is the same whether one process holds envs 0-3 or another holds envs 2-3."""
    rng = random.Random(0)
    one, two = (
        bt.vector_env(4, seed=3, level="BabyAI-PickupLoc-v0"),
        bt.vector_env(2, seed=3, first_index=2, level="BabyAI-PickupLoc-v0"),
    )
    a, b = one.reset(), two.reset()
    assert a[0][2:] == b[0] and a[1][2:] == b[1]
    for _ in range(80):
        actions = [rng.choice(ACTIONS) for _ in range(4)]
        a, b = one.step(actions), two.step(actions[2:])
        assert a[0][2:] == b[0] and a[4][2:] == b[4]
    assert (
        bt.vector_env(2, seed=3, stream=1, level="BabyAI-PickupLoc-v0").reset()
        != bt.vector_env(2, seed=3, level="BabyAI-PickupLoc-v0").reset()
    )


def test_vector_env_reports_success_in_final_info():
    rng = random.Random(2)
    envs = bt.vector_env(4, seed=1, level="BabyAI-GoToObj-v0")
    assert envs.num_envs == 4 and envs.max_actions == 6
    _, infos = envs.reset()
    successes = 0
    for _ in range(300):
        goals = [info["goal"] for info in infos]
        _, rewards, terminated, truncated, infos = envs.step([rng.choice(ACTIONS) for _ in range(4)])
        assert rewards.dtype == np.float32 and terminated.dtype == bool and truncated.dtype == bool
        for i in range(4):
            final = infos[i].get("final_info")
            assert (final is not None) == bool(terminated[i] or truncated[i])
            info = final or infos[i]
            assert info["success"] == (rewards[i] == 1.0) == (goals[i] in info["achieved_goals"])
            assert set(info) == {"goal", "possible_actions", "success", "achieved_goals"} and info["goal"] == goals[i]
            successes += bool(rewards[i])
            if final:
                assert set(infos[i]) == {"goal", "possible_actions", "final_observation", "final_info"}
    assert successes >= 3


# --------------------------------------------------------------------------------------------------
# 5. The text
# --------------------------------------------------------------------------------------------------
def test_observation_of_a_hand_built_room():
    """An 8x8 room; the agent at (2, 4) facing east (+x), so its left is north (-y), carrying a yellow key."""
    env = bt.BabyAIText("BabyAI-GoToObj-v0", seed=0)
    env.reset()
    mg = env.minigrid
    mg.grid = Grid(8, 8)
    mg.grid.wall_rect(0, 0, 8, 8)
    mg.grid.set(5, 4, Ball("red"))  # 3 ahead
    mg.grid.set(3, 2, Key("green"))  # 1 ahead, 2 to the left
    mg.grid.set(7, 5, Door("blue", is_open=False))  # in the east wall: 5 ahead, 1 to the right
    mg.grid.set(1, 4, Box("purple"))  # behind the agent: out of view
    mg.agent_pos, mg.agent_dir, mg.carrying = (2, 4), 0, Key("yellow")
    # Walls: of those in view, only the nearest straight ahead (7, 4) and to the right (2, 7); the north wall is 4 to
    # the left, out of the 7x7 view.
    assert bt.describe(mg.gen_obs()["image"]) == (
        "You see a wall 3 steps right\n"
        "You see a green key 1 step forward and 2 steps left\n"
        "You see a red ball 3 steps forward\n"
        "You see a wall 5 steps forward\n"
        "You see a closed blue door 5 steps forward and 1 step right\n"
        "You carry a yellow key"
    )


def test_describe_encoded_view():
    """The encoding read directly: a 7x7 view, agent at (3, 6) facing up; unseen cells are not described."""
    image = np.zeros((7, 7, 3), dtype=np.uint8)  # all unseen
    image[:, 4:, 0] = OBJECT_TO_IDX["empty"]

    def put(i, j, kind, color="grey", state=0):
        image[i, j] = (OBJECT_TO_IDX[kind], COLOR_TO_IDX[color], state)

    put(3, 3, "wall")  # 3 ahead
    put(4, 3, "wall")  # not straight ahead, left or right: not said
    put(0, 6, "wall")  # 3 left
    put(2, 6, "ball", "red")  # 1 left
    put(5, 5, "door", "green", 2)  # 1 ahead, 2 right, locked
    put(3, 5, "door", "yellow", 0)  # 1 ahead, open
    put(3, 6, "empty")
    assert bt.describe(image) == (
        "You see a wall 3 steps left\n"
        "You see a red ball 1 step left\n"
        "You see an open yellow door 1 step forward\n"
        "You see a locked green door 1 step forward and 2 steps right\n"
        "You see a wall 3 steps forward"
    )
    assert bt.describe(np.zeros((7, 7, 3), dtype=np.uint8)) == "You see nothing"


def test_prompt_and_names():
    assert bt.NAME == "BabyAI" and bt.SPLITS == ("train", "test") and bt.GOAL_TYPES == ("go_to", "pick_up")
    assert bt.format_prompt("go to the red ball", "You see a wall 1 step forward") == (
        "Goal: go to the red ball\nYou see a wall 1 step forward\nAction:"
    )
    assert bt.goal_type("pick up a red object") == "pick_up" and bt.goal_type("go to the blue key") == "go_to"
    assert bt.Options().level == "BabyAI-GoToLocal-v0"
    obs, infos = bt.vector_env(2, seed=0).reset()
    assert all(o and "Goal" not in o and i["goal"] not in o for o, i in zip(obs, infos))


# --------------------------------------------------------------------------------------------------
# 6. minigrid's prints stay out of stdout
# --------------------------------------------------------------------------------------------------
def test_no_minigrid_prints(capsys):
    raw = gym.make("BabyAI-GoTo-v0").unwrapped
    for seed in range(20):
        raw.reset(seed=seed)
    assert "Sampling rejected" in capsys.readouterr().out  # minigrid does print, so the check below can fail
    envs = bt.vector_env(2, seed=0, level="BabyAI-GoTo-v0")
    for _ in range(10):
        envs.reset()
    local = bt.vector_env(4, seed=0, level="BabyAI-GoToLocal-v0")
    for _ in range(50):
        local.reset()
    assert capsys.readouterr().out == ""


# --------------------------------------------------------------------------------------------------
# 7. Bad input
# --------------------------------------------------------------------------------------------------
def test_bad_input_names_the_fix():
    with pytest.raises(ValueError, match="--level must be one of .*BabyAI-GoToLocal-v0"):
        bt.vector_env(1, 0, level="BabyAI-BossLevel-v0")
    with pytest.raises(ValueError, match="allowed splits are train, test"):
        bt.vector_env(1, 0, split="valid")
    with pytest.raises(ValueError, match="options are level"):
        bt.vector_env(1, 0, num_objects=3)
    with pytest.raises(ValueError, match="non-negative integer"):
        bt.vector_env(1, -1)
    with pytest.raises(ValueError, match="positive integer"):
        bt.vector_env(0, 0)
    with pytest.raises(ValueError, match="start with 'go to' or 'pick up'"):
        bt.goal_type("open the red door")
    envs = bt.vector_env(2, 0)
    envs.reset()
    before = envs.state_dict()
    with pytest.raises(ValueError, match=r"env 1: invalid action 'Grasp': possible actions are \['turn left'"):
        envs.step(["go forward", "Grasp"])
    assert envs.state_dict() == before  # no env moved
    with pytest.raises(ValueError, match="one action per env"):
        envs.step(["go forward"])
