"""Tests of playground_text.py against the specification of the issue.

The expected values below are written from the specification (object types, growth rules, goal grammar,
horizons), not read back from the module, so that each test can fail if the environment drifts from it.
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import playground_text as pt  # noqa: E402

# --------------------------------------------------------------------------------------------------
# The world as the specification states it (hand-written, independent of the module)
# --------------------------------------------------------------------------------------------------
FURNITURE = ("door", "chair", "desk", "lamp", "table", "cupboard", "sink", "window", "sofa", "carpet")
PLANTS = ("cactus", "carnivorous", "flower", "tree", "bush", "grass", "algae", "tea", "rose", "bonsai")
ANIMALS = ("dog", "cat", "chameleon", "human", "fly", "parrot", "mouse", "lion", "pig", "cow")
SUPPLIES = ("food", "water")
TYPES_BY_CATEGORY = {"furniture": FURNITURE, "plant": PLANTS, "animal": ANIMALS, "supply": SUPPLIES}
CATEGORY = {t: c for c, ts in TYPES_BY_CATEGORY.items() for t in ts}
COLORS = ("red", "green", "blue")
ALL_OBJECTS = tuple(f"{c} {t}" for t in CATEGORY for c in COLORS)
# Which supply grows which category (water: plants and animals; food: animals only).
GROWN_BY = {"plant": {"water"}, "animal": {"water", "food"}}
PLAN_LENGTH = {"grasp": 2, "grow": 4, "grow_then_grasp": 6, "grow_then_grow": 8}
HORIZON = {"grasp": 6, "grow": 12, "grow_then_grasp": 18, "grow_then_grow": 24}

GRASP_NAMES = tuple(CATEGORY) + ("furniture", "plant", "animal", "supply", "living_thing")
GROW_NAMES = PLANTS + ANIMALS + ("animal", "plant", "living_thing")


def _simple(verb, names):
    return (
        [f"{verb} {c} {n}" for c in COLORS for n in names]
        + [f"{verb} any {c} thing" for c in COLORS]
        + [f"{verb} any {n}" for n in names]
    )


SIMPLE_GRASP = _simple("Grasp", GRASP_NAMES)
SIMPLE_GROW = _simple("Grow", GROW_NAMES)
# The held-out simple goals of the original Playground, written out.
TEST_GRASP = {f"Grasp {c} {n}" for c in COLORS + ("any",) for n in ("flower", "animal", "fly")} | {
    "Grasp red tree",
    "Grasp green dog",
    "Grasp blue door",
}
TEST_GROW = {f"Grow {c} {n}" for c in COLORS + ("any",) for n in PLANTS + ("plant", "living_thing")} | {"Grow green dog"}

TRAIN = pt.all_goals("train")
TEST = pt.all_goals("test")
ALL_GOALS = set(TRAIN) | set(TEST)


def _second(description):
    return description[0].lower() + description[1:]


def _phrase(description):
    """What a simple description is about: "Grasp red cat" -> "red cat", "Grow any red thing" -> "any red thing"."""
    return description.split(" ", 1)[1]


def describes(description, name):
    """Does the simple description (either case of the verb) hold of an event on object `name`?"""
    words = description.split(" ")
    color, kind = name.split(" ")
    category = CATEGORY[kind]
    living = category in ("plant", "animal")
    if words[0].lower() == "grow" and not living:
        return False
    if len(words) == 4:
        assert words[1] == "any" and words[3] == "thing", description
        return words[2] == color
    assert len(words) == 3, description
    if words[1] not in ("any", color):
        return False
    return words[2] in (kind, category) or (words[2] == "living_thing" and living)


# Every simple description an event on an object achieves (the social partner's synonyms), by the rules above.
EVENT_DESCRIPTIONS = {
    (verb, name): frozenset(d for d in (SIMPLE_GRASP if verb == "Grasp" else SIMPLE_GROW) if describes(d, name))
    for verb in ("Grasp", "Grow")
    for name in ALL_OBJECTS
}


def parse(observation):
    lines = observation.split("\n")
    assert [line.split(": ", 1)[0] for line in lines] == ["You see", "You are on", "You are holding", "You have grown"]

    def items(line):
        value = line.split(": ", 1)[1]
        return [] if value == "nothing" else value.split(", ")

    see, on, holding, grown = (items(line) for line in lines)
    assert len(on) <= 1 and len(holding) <= 1
    return {"see": see, "on": on[0] if on else None, "holding": holding[0] if holding else None, "grown": grown}


def obs_text(see, on=None, holding=None, grown=()):
    return (
        f"You see: {', '.join(see) or 'nothing'}\nYou are on: {on or 'nothing'}\n"
        f"You are holding: {holding or 'nothing'}\nYou have grown: {', '.join(grown) or 'nothing'}"
    )


# A goal that cannot be achieved with a single release (it needs two grows): keeps scripted episodes running.
LONG_GOAL = "Grow any cow then grow any pig"


# --------------------------------------------------------------------------------------------------
# 0. World constants and the text interface
# --------------------------------------------------------------------------------------------------
def test_world_matches_specification():
    assert {c: tuple(ts) for c, ts in pt.CATEGORIES.items()} == TYPES_BY_CATEGORY
    assert len(CATEGORY) == 32 and pt.COLORS == COLORS
    assert sorted(pt.OBJECT_NAMES) == sorted(ALL_OBJECTS) and len(pt.OBJECT_NAMES) == 96
    assert pt.HORIZON == HORIZON


def test_format_prompt_and_initial_observation():
    env = pt.PlaygroundText()
    obs, info = env.reset(goal="Grasp red door", objects=["red door", "blue water", "green mouse"])
    assert obs == (
        "You see: red door, blue water, green mouse\nYou are on: nothing\nYou are holding: nothing\nYou have grown: nothing"
    )
    assert info == {
        "goal": "Grasp red door",
        "goal_type": "grasp",
        "possible_actions": ["Go to red door", "Go to blue water", "Go to green mouse"],
        "horizon": 6,
    }
    assert pt.format_prompt("Grasp red door", obs) == (
        "Goal: Grasp red door\nYou see: red door, blue water, green mouse\nYou are on: nothing\n"
        "You are holding: nothing\nYou have grown: nothing\nAction:"
    )


def test_grasp_release_mechanics_and_actions():
    env = pt.PlaygroundText()
    scene = ["red door", "blue water", "green mouse"]
    env.reset(goal=LONG_GOAL, objects=scene)
    go = {f"Go to {n}" for n in scene}

    obs, r, term, trunc, info = env.step("Go to blue water")
    assert obs == obs_text(scene, on="blue water")
    assert set(info["possible_actions"]) == go | {"Grasp"} and len(info["possible_actions"]) == 4
    assert (r, term, trunc, info["achieved_goals"]) == (0.0, False, False, [])

    obs, r, term, trunc, info = env.step("Grasp")  # picks up what it stands on; then on nothing
    assert obs == obs_text(["red door", "green mouse"], holding="blue water")
    assert set(info["possible_actions"]) == {"Go to red door", "Go to green mouse", "Release"}
    assert len(info["possible_actions"]) == 3

    obs, *_, info = env.step("Go to red door")
    assert obs == obs_text(["red door", "green mouse"], on="red door", holding="blue water")
    assert set(info["possible_actions"]) == {"Go to red door", "Go to green mouse", "Release"}

    obs, *_, info = env.step("Release")  # put down where it stands; then stands on the released object
    assert obs == obs_text(scene, on="blue water")
    assert set(info["possible_actions"]) == go | {"Grasp"}
    assert info["achieved_goals"] == []  # water on furniture: nothing grows

    env.step("Grasp")
    obs, *_, info = env.step("Release")  # released on nothing
    assert obs == obs_text(scene, on="blue water")
    assert info["achieved_goals"] == []


# --------------------------------------------------------------------------------------------------
# 1. The rules table
# --------------------------------------------------------------------------------------------------
# (supply, category of the other object) -> does the other object grow when they meet (either direction)?
GROWTH_TABLE = {
    ("food", "furniture"): False,
    ("food", "plant"): False,
    ("food", "animal"): True,
    ("food", "supply"): False,
    ("water", "furniture"): False,
    ("water", "plant"): True,
    ("water", "animal"): True,
    ("water", "supply"): False,
}


def _release_on(env, top, bottom):
    """Carry `top` onto `bottom` and release it there; return the observation and info of the release step."""
    for action in (f"Go to {top}", "Grasp", f"Go to {bottom}"):
        *_, info = env.step(action)
        if action != "Grasp":
            assert info["achieved_goals"] == []
    obs, r, term, trunc, info = env.step("Release")
    assert (r, term, trunc) == (0.0, False, False)
    return obs, info


def test_rules_table_every_supply_every_category_both_directions():
    env = pt.PlaygroundText()
    checked = 0
    for (supply, category), grows in GROWTH_TABLE.items():
        for kind in TYPES_BY_CATEGORY[category]:
            for supply_color in COLORS:
                for target_color in COLORS:
                    s, t = f"{supply_color} {supply}", f"{target_color} {kind}"
                    if s == t:
                        continue
                    for top, bottom in ((s, t), (t, s)):
                        env.reset(goal=LONG_GOAL, objects=[t, s])
                        obs, info = _release_on(env, top, bottom)
                        state = parse(obs)
                        assert state["on"] == top and state["holding"] is None
                        assert state["grown"] == ([t] if grows else []), (top, bottom)
                        expected = EVENT_DESCRIPTIONS["Grow", t] if grows else frozenset()
                        assert set(info["achieved_goals"]) == expected, (top, bottom)
                        assert len(info["achieved_goals"]) == len(expected)
                        # A thing grows once: the same meeting again grows nothing more.
                        obs, info = _release_on(env, top, bottom)
                        assert parse(obs)["grown"] == ([t] if grows else [])
                        assert info["achieved_goals"] == []
                        checked += 1
    # 2 supplies x 3 other categories x 10 types x 9 color pairs, plus supply on supply (identical names skipped),
    # each in both directions.
    assert checked == 2 * (2 * 3 * 10 * 9 + 2 * (2 * 9 - 3))


def test_rules_table_literal_examples():
    env = pt.PlaygroundText()
    env.reset(goal=LONG_GOAL, objects=["green mouse", "red food"])
    obs, info = _release_on(env, "red food", "green mouse")
    assert obs == obs_text(["green mouse", "red food"], on="red food", grown=["green mouse"])
    assert set(info["achieved_goals"]) == {
        "Grow green mouse",
        "Grow green animal",
        "Grow green living_thing",
        "Grow any mouse",
        "Grow any animal",
        "Grow any living_thing",
        "Grow any green thing",
    }
    env.reset(goal=LONG_GOAL, objects=["red rose", "blue food"])
    obs, info = _release_on(env, "red rose", "blue food")
    assert obs == obs_text(["red rose", "blue food"], on="red rose") and info["achieved_goals"] == []
    env.reset(goal=LONG_GOAL, objects=["red rose", "blue water"])
    obs, info = _release_on(env, "red rose", "blue water")
    assert obs == obs_text(["red rose", "blue water"], on="red rose", grown=["red rose"])
    assert set(info["achieved_goals"]) == {
        "Grow red rose",
        "Grow red plant",
        "Grow red living_thing",
        "Grow any rose",
        "Grow any plant",
        "Grow any living_thing",
        "Grow any red thing",
    }


# --------------------------------------------------------------------------------------------------
# 2. Sequential goals: order matters
# --------------------------------------------------------------------------------------------------
def _run_script(env, script):
    """Run (action, expected reward) pairs; return the last observation and the infos."""
    infos = []
    for t, (action, reward) in enumerate(script, 1):
        obs, r, term, trunc, info = env.step(action)
        assert (r, term, trunc) == (reward, reward == 1.0, False), (t, action)
        assert (info["goal"] in info["achieved_goals"]) == (reward == 1.0)
        infos.append(info)
    return obs, infos


def test_grow_then_grasp_b_before_a_does_not_count():
    env = pt.PlaygroundText()
    goal = "Grow green mouse then grasp red door"
    assert goal in TRAIN
    _, info = env.reset(goal=goal, objects=["red door", "green mouse", "blue water"])
    assert info["goal_type"] == "grow_then_grasp" and info["horizon"] == 18
    obs, infos = _run_script(
        env,
        [
            ("Go to red door", 0.0),
            ("Grasp", 0.0),  # B before A
            ("Release", 0.0),
            ("Go to blue water", 0.0),
            ("Grasp", 0.0),
            ("Go to green mouse", 0.0),
            ("Release", 0.0),  # A
            ("Go to red door", 0.0),
            ("Grasp", 1.0),  # B again, after A
        ],
    )
    assert "Grasp red door" in infos[1]["achieved_goals"]
    assert "Grow green mouse" in infos[6]["achieved_goals"]
    assert not any(" then " in d for i in infos[:7] for d in i["achieved_goals"])
    assert "Grasp red door" not in infos[8]["achieved_goals"]  # already achieved in this episode
    with pytest.raises(RuntimeError):
        env.step("Release")


def test_grow_then_grow_b_before_a_does_not_count():
    env = pt.PlaygroundText()
    goal = "Grow green mouse then grow any cat"
    assert goal in TRAIN
    env.reset(goal=goal, objects=["blue cat", "green mouse", "red cat", "blue water"])
    obs, infos = _run_script(
        env,
        [
            ("Go to blue water", 0.0),
            ("Grasp", 0.0),
            ("Go to blue cat", 0.0),
            ("Release", 0.0),  # B (a cat grows) before A
            ("Grasp", 0.0),
            ("Go to green mouse", 0.0),
            ("Release", 0.0),  # A
            ("Grasp", 0.0),
            ("Go to blue cat", 0.0),
            ("Release", 0.0),  # the blue cat has grown already: nothing happens
            ("Grasp", 0.0),
            ("Go to red cat", 0.0),
            ("Release", 1.0),  # another cat grows after A
        ],
    )
    assert "Grow any cat" in infos[3]["achieved_goals"]
    assert "Grow any cat then grow green mouse" in infos[6]["achieved_goals"]
    assert goal not in infos[6]["achieved_goals"]
    assert infos[9]["achieved_goals"] == []
    assert parse(obs)["grown"] == ["blue cat", "green mouse", "red cat"]


def test_a_and_b_at_the_same_step_do_not_count():
    env = pt.PlaygroundText()
    goal = "Grow any animal then grow any cat"
    assert goal in TRAIN
    env.reset(goal=goal, objects=["blue cat", "red cat", "green food"])
    obs, infos = _run_script(
        env,
        [
            ("Go to blue cat", 0.0),
            ("Grasp", 0.0),
            ("Go to green food", 0.0),
            ("Release", 0.0),  # a cat grows: A and B at once
            ("Go to green food", 0.0),
            ("Grasp", 0.0),
            ("Go to red cat", 0.0),
            ("Release", 1.0),  # second cat: B strictly after A
        ],
    )
    assert {"Grow any animal", "Grow any cat"} <= set(infos[3]["achieved_goals"])
    assert not any(" then " in d for d in infos[3]["achieved_goals"])


def test_grow_then_grasp_reward_at_b_only():
    env = pt.PlaygroundText()
    goal = "Grow any red thing then grasp blue water"
    assert goal in TRAIN
    env.reset(goal=goal, objects=["red cactus", "blue water"])
    _run_script(env, [("Go to blue water", 0.0), ("Grasp", 0.0), ("Go to red cactus", 0.0), ("Release", 0.0), ("Grasp", 1.0)])


# --------------------------------------------------------------------------------------------------
# 3. The goal space
# --------------------------------------------------------------------------------------------------
def test_goal_space_counts():
    counts = {s: {k: len(pt.all_goals(s, k)) for k in HORIZON} for s in ("train", "test")}
    assert counts == {
        "train": {"grasp": 136, "grow": 46, "grow_then_grasp": 6218, "grow_then_grow": 2070},
        "test": {"grasp": 15, "grow": 49, "grow_then_grasp": 8032, "grow_then_grow": 6860},
    }
    assert len(TRAIN) == len(set(TRAIN)) == 8470 and len(TEST) == len(set(TEST)) == 14956
    assert not set(TRAIN) & set(TEST)
    assert round(100 * (2070 + 6218) / len(TRAIN), 2) == 97.85
    assert pt.all_goals() == TRAIN
    assert pt.all_goals("train", ["grow", "grasp"]) == pt.all_goals("train", "grow") + pt.all_goals("train", "grasp")


def test_goal_space_contents_and_held_out_rule():
    assert set(pt.all_goals("test", "grasp")) == TEST_GRASP
    assert set(pt.all_goals("test", "grow")) == TEST_GROW
    train_grasp, train_grow = set(SIMPLE_GRASP) - TEST_GRASP, set(SIMPLE_GROW) - TEST_GROW
    assert set(pt.all_goals("train", "grasp")) == train_grasp
    assert set(pt.all_goals("train", "grow")) == train_grow
    for kind, b_goals, train_b in (
        ("grow_then_grasp", SIMPLE_GRASP, train_grasp),
        ("grow_then_grow", SIMPLE_GROW, train_grow),
    ):
        pairs = {(a, b) for a in SIMPLE_GROW for b in b_goals if _phrase(a) != _phrase(b)}
        train = {f"{a} then {_second(b)}" for a, b in pairs if a in train_grow and b in train_b}
        test = {f"{a} then {_second(b)}" for a, b in pairs} - train
        assert set(pt.all_goals("train", kind)) == train
        assert set(pt.all_goals("test", kind)) == test
    for goal, split in [
        ("Grasp any flower", "test"),
        ("Grow any red thing", "train"),
        ("Grow red fly", "train"),
        ("Grasp red fly", "test"),
        ("Grasp any plant", "train"),
        ("Grasp blue tree", "train"),
        ("Grasp red tree", "test"),
        ("Grow any living_thing", "test"),
        ("Grasp any living_thing", "train"),
        ("Grow red cat then grasp red door", "train"),
        ("Grow red cat then grasp blue door", "test"),
        ("Grow red rose then grasp red door", "test"),
        ("Grow red cat then grow blue cat", "train"),
        ("Grow red cat then grow blue rose", "test"),
    ]:
        assert (goal in TRAIN, goal in TEST) == (split == "train", split == "test"), goal
    for goal in (
        "Grow red cat then grasp red cat",
        "Grow any animal then grow any animal",
        "Grow any red thing then grasp any red thing",
        "Grasp red cat then grow blue cat",
        "Grow red door",
        "Grow red cat then Grasp red door",
    ):
        assert goal not in ALL_GOALS
        with pytest.raises(ValueError):
            pt.goal_type(goal)
    assert pt.goal_type("Grow red cat then grasp red door") == "grow_then_grasp"
    assert pt.goal_type("Grow red cat then grow blue rose") == "grow_then_grow"
    assert pt.goal_type("Grasp any flower") == "grasp"


# --------------------------------------------------------------------------------------------------
# 4. The social partner
# --------------------------------------------------------------------------------------------------
GREEN_MOUSE_GROWN = [
    "Grow green mouse",
    "Grow green animal",
    "Grow green living_thing",
    "Grow any mouse",
    "Grow any animal",
    "Grow any living_thing",
    "Grow any green thing",
]
RED_ROSE_GROWN = [
    "Grow red rose",
    "Grow red plant",
    "Grow red living_thing",
    "Grow any rose",
    "Grow any plant",
    "Grow any living_thing",
    "Grow any red thing",
]
BLUE_WATER_GRASPED = ["Grasp blue water", "Grasp blue supply", "Grasp any water", "Grasp any supply", "Grasp any blue thing"]
GREEN_MOUSE_GRASPED = [
    "Grasp green mouse",
    "Grasp green animal",
    "Grasp green living_thing",
    "Grasp any mouse",
    "Grasp any animal",
    "Grasp any living_thing",
    "Grasp any green thing",
]


def _then(grow_a, goals_b):
    return {f"{a} then {_second(b)}" for a in grow_a for b in goals_b if _phrase(a) != _phrase(b)}


def test_social_partner_scripted_episode():
    env = pt.PlaygroundText()
    assert LONG_GOAL in TRAIN
    env.reset(goal=LONG_GOAL, objects=["red door", "green mouse", "blue water", "red rose", "green food"])
    expected = [
        ("Go to red door", set()),
        (
            "Grasp",
            {"Grasp red door", "Grasp red furniture", "Grasp any door", "Grasp any furniture", "Grasp any red thing"},
        ),
        ("Release", set()),
        ("Go to blue water", set()),
        ("Grasp", set(BLUE_WATER_GRASPED)),
        ("Go to green mouse", set()),
        ("Release", set(GREEN_MOUSE_GROWN)),
        ("Grasp", _then(GREEN_MOUSE_GROWN, BLUE_WATER_GRASPED)),  # the water again, after a grow
        ("Go to red rose", set()),
        # "Grow any living_thing" was achieved already in this episode: not new.
        ("Release", (set(RED_ROSE_GROWN) - {"Grow any living_thing"}) | _then(GREEN_MOUSE_GROWN, RED_ROSE_GROWN)),
        ("Go to green mouse", set()),
        ("Grasp", set(GREEN_MOUSE_GRASPED) | _then(GREEN_MOUSE_GROWN + RED_ROSE_GROWN, GREEN_MOUSE_GRASPED)),
        ("Go to green food", set()),
        ("Release", set()),  # a grown mouse on food does not grow again
        ("Go to red door", set()),
        (
            "Grasp",
            _then(
                GREEN_MOUSE_GROWN + RED_ROSE_GROWN,
                ["Grasp red door", "Grasp red furniture", "Grasp any door", "Grasp any furniture", "Grasp any red thing"],
            ),
        ),
    ]
    assert len(_then(GREEN_MOUSE_GROWN, BLUE_WATER_GRASPED)) == 35
    assert len(_then(GREEN_MOUSE_GROWN, RED_ROSE_GROWN)) == 48
    assert "Grow green mouse then grasp any animal" in expected[11][1]
    assert "Grow green mouse then grasp green mouse" not in expected[11][1]
    seen = []
    for t, (action, achieved) in enumerate(expected, 1):
        obs, r, term, trunc, info = env.step(action)
        assert set(info["achieved_goals"]) == achieved, (t, action)
        assert (r, term, trunc) == (0.0, False, False)
        seen += info["achieved_goals"]
    assert len(seen) == len(set(seen))  # nothing is listed twice in an episode
    assert set(seen) <= ALL_GOALS
    assert "Grow green mouse then grow red rose" in seen and "Grow green mouse then grow red rose" in TEST
    assert "Grow green mouse then grasp blue water" in seen and "Grow green mouse then grasp blue water" in TRAIN


def test_social_partner_reward_for_every_synonym():
    red_door = ["Grasp red door", "Grasp red furniture", "Grasp any door", "Grasp any furniture", "Grasp any red thing"]
    env = pt.PlaygroundText()
    for goal in red_door + ["Grasp blue door", "Grasp any chair", "Grasp any green thing", "Grasp red animal"]:
        env.reset(goal=goal, objects=["red door", "blue water"])
        env.step("Go to red door")
        obs, r, term, trunc, info = env.step("Grasp")
        assert set(info["achieved_goals"]) == set(red_door) and len(info["achieved_goals"]) == 5
        assert (r, term) == ((1.0, True) if goal in red_door else (0.0, False))
    for goal in GREEN_MOUSE_GROWN:
        env.reset(goal=goal, objects=["green mouse", "blue water"])
        obs, info = _release_on_scripted(env, "blue water", "green mouse")
        assert set(info["achieved_goals"]) == set(GREEN_MOUSE_GROWN)


def _release_on_scripted(env, top, bottom):
    for action in (f"Go to {top}", "Grasp", f"Go to {bottom}"):
        env.step(action)
    obs, r, term, trunc, info = env.step("Release")
    assert (r, term, trunc) == (1.0, True, False)
    return obs, info


# --------------------------------------------------------------------------------------------------
# 5. A planner that reads only the goal and the observation
# --------------------------------------------------------------------------------------------------
def _supply_for(target, objects):
    ok = [o for o in objects if o.split(" ")[1] in GROWN_BY[CATEGORY[target.split(" ")[1]]]]
    return ok[0] if ok else None


def _growable(description, objects, grown):
    return [o for o in objects if describes(description, o) and o not in grown and _supply_for(o, objects)]


def _grasp_step(state, target):
    if state["holding"] is not None:
        return "Release"
    return "Grasp" if state["on"] == target else f"Go to {target}"


def _grow_step(state, target, objects):
    supply = _supply_for(target, objects)
    if state["holding"] == supply:
        return "Release" if state["on"] == target else f"Go to {target}"
    if state["holding"] is not None:
        return "Release"
    return "Grasp" if state["on"] == supply else f"Go to {supply}"


def planner(goal, observation):
    state = parse(observation)
    objects = sorted(state["see"] + ([state["holding"]] if state["holding"] else []))
    grown = state["grown"]
    first, _, second = goal.partition(" then ")
    if not second:
        if first.startswith("Grasp"):
            return _grasp_step(state, next(o for o in objects if describes(first, o)))
        return _grow_step(state, _growable(first, objects, grown)[0], objects)
    grow_b = second.startswith("grow ")

    def b_targets(exclude):
        found = _growable(second, objects, grown) if grow_b else [o for o in objects if describes(second, o)]
        return [o for o in found if o != exclude]

    if any(describes(first, g) for g in grown):  # A happened at an earlier step: now B
        targets = b_targets(None)
        target = ([o for o in targets if o not in grown] or targets)[0]
        return _grow_step(state, target, objects) if grow_b else _grasp_step(state, target)
    first_target = next(o for o in _growable(first, objects, grown) if b_targets(o))
    return _grow_step(state, first_target, objects)


def _solve(env, goal, seed):
    obs, info = env.reset(seed=seed, goal=goal)
    kind = info["goal_type"]
    assert info["goal"] == goal and info["horizon"] == HORIZON[kind]
    assert len(parse(obs)["see"]) == env.num_objects
    for t in range(1, info["horizon"] + 1):
        action = planner(goal, obs)
        assert action in info["possible_actions"], (goal, obs, action)
        obs, r, term, trunc, info = env.step(action)
        if term:
            assert r == 1.0 and not trunc and goal in info["achieved_goals"]
            return kind, t
        assert (r, trunc) == (0.0, False), (goal, t)
    raise AssertionError(f"planner did not reach {goal!r} within the horizon")


def test_planner_solves_sampled_goals_six_objects():
    rng = random.Random(2024)
    sample = rng.sample(TRAIN, 1000) + rng.sample(TEST, 300)
    env = pt.PlaygroundText(num_objects=6)
    kinds = set()
    for i, goal in enumerate(sample):
        kind, steps = _solve(env, goal, seed=i)
        assert steps <= PLAN_LENGTH[kind], (goal, steps)
        kinds.add(kind)
    assert kinds == set(HORIZON)


def test_planner_solves_sequential_goals_three_objects():
    rng = random.Random(7)
    sequential = [g for g in TRAIN + TEST if " then " in g]
    env = pt.PlaygroundText(num_objects=3)
    for i, goal in enumerate(rng.sample(sequential, 400)):
        kind, steps = _solve(env, goal, seed=1000 + i)
        assert steps <= PLAN_LENGTH[kind]
    env = pt.PlaygroundText(num_objects=2, goal_types=("grasp", "grow"))
    simple = [g for g in TRAIN + TEST if " then " not in g]
    for i, goal in enumerate(rng.sample(simple, 150)):
        kind, steps = _solve(env, goal, seed=i)
        assert steps <= PLAN_LENGTH[kind]


# --------------------------------------------------------------------------------------------------
# 6. Random-policy soak with an independent oracle of the social partner
# --------------------------------------------------------------------------------------------------
def _soak(env, rng, steps):
    goals = set(env.goals)
    n = env.num_objects
    done_steps = episodes = successes = truncations = 0
    while done_steps < steps:
        obs, info = env.reset()
        goal, horizon = info["goal"], info["horizon"]
        assert goal in goals and info["goal_type"] == pt.goal_type(goal) and horizon == HORIZON[info["goal_type"]]
        state = parse(obs)
        assert state["on"] is None and state["holding"] is None and state["grown"] == []
        assert len(state["see"]) == len(set(state["see"])) == n and set(state["see"]) <= set(ALL_OBJECTS)
        achieved_so_far, grow_history = set(), set()
        episodes += 1
        for t in range(1, horizon + 1):
            action = rng.choice(info["possible_actions"])
            obs, r, term, trunc, info = env.step(action)
            done_steps += 1
            new = parse(obs)
            # Transition and the growth rules, from the observation alone.
            event = None
            if action == "Grasp":
                assert new["holding"] == state["on"] and new["on"] is None and state["holding"] is None
                event = ("Grasp", state["on"])
            elif action == "Release":
                released, under = state["holding"], state["on"]
                assert new["on"] == released and new["holding"] is None
                grows = None
                for target, supply in ((released, under), (under, released)):
                    if target and supply and target not in state["grown"]:
                        if supply.split(" ")[1] in GROWN_BY.get(CATEGORY[target.split(" ")[1]], ()):
                            grows = target
                assert new["grown"] == state["grown"] + ([grows] if grows else [])
                if grows:
                    event = ("Grow", grows)
            else:
                assert action.startswith("Go to ") and new["on"] == action[6:]
                assert new["holding"] == state["holding"] and new["grown"] == state["grown"]
            assert sorted(new["see"] + ([new["holding"]] if new["holding"] else [])) == sorted(
                state["see"] + ([state["holding"]] if state["holding"] else [])
            )
            expected_actions = {f"Go to {o}" for o in new["see"]}
            if new["holding"]:
                expected_actions.add("Release")
            elif new["on"]:
                expected_actions.add("Grasp")
            assert len(info["possible_actions"]) == len(expected_actions)
            assert set(info["possible_actions"]) == expected_actions
            # The social partner: every goal description newly true at this step.
            expected = set()
            if event:
                simple = EVENT_DESCRIPTIONS[event]
                expected = set(simple)
                for a in grow_history:
                    for b in simple:
                        seq = f"{a} then {_second(b)}"
                        if seq in ALL_GOALS:
                            expected.add(seq)
                expected -= achieved_so_far
                if event[0] == "Grow":
                    grow_history |= simple
            achieved = info["achieved_goals"]
            assert len(achieved) == len(set(achieved)) and set(achieved) == expected, (goal, t, action)
            achieved_so_far |= expected
            # Reward, termination and truncation.
            assert isinstance(r, float) and r == (1.0 if goal in achieved else 0.0)
            assert term == (r == 1.0)
            assert trunc == (not term and t == horizon)
            state = new
            if term or trunc:
                successes += term
                truncations += trunc
                break
        else:
            raise AssertionError("episode longer than its horizon")
        with pytest.raises(RuntimeError):
            env.step(info["possible_actions"][0])
    return episodes, successes, truncations


def test_random_policy_soak():
    rng = random.Random(99)
    totals = []
    # (env, steps, least successes expected of a random policy: sequential goals are rarely reached by chance)
    for env, steps, least in (
        (pt.PlaygroundText(num_objects=6, seed=1), 60_000, 5),
        (pt.PlaygroundText(num_objects=6, split="test", seed=2), 15_000, 1),
        (pt.PlaygroundText(num_objects=3, goal_types=("grasp", "grow"), seed=3), 25_000, 500),
        (pt.PlaygroundText(num_objects=20, seed=4), 2_000, 0),
    ):
        episodes, successes, truncations = _soak(env, rng, steps)
        assert episodes == successes + truncations
        assert successes >= least and truncations > 0
        totals.append(episodes)
    assert sum(totals) > 5_000


# --------------------------------------------------------------------------------------------------
# 7. Seeding
# --------------------------------------------------------------------------------------------------
def trace(seed, episodes=40):
    env = pt.PlaygroundText(seed=seed)
    rng = random.Random(seed + 1000)
    out = []
    for _ in range(episodes):
        obs, info = env.reset()
        out.append((info["goal"], obs))
        done = False
        while not done:
            action = rng.choice(info["possible_actions"])
            obs, r, term, trunc, info = env.step(action)
            out.append((action, obs, r, tuple(info["achieved_goals"])))
            done = term or trunc
    return out


def trace_digest(seed):
    return hashlib.sha256(repr(trace(seed)).encode()).hexdigest()


def test_seeding_determinism_single_env():
    a, b, c = trace(3), trace(3), trace(4)
    assert a == b
    assert a != c

    def goals(tr):
        return [x[0] for x in tr if len(x) == 2]

    assert goals(a) != goals(c) and len(goals(a)) == 40
    # reset(seed=...) reseeds an env that has been used.
    env = pt.PlaygroundText(seed=11)
    for _ in range(5):
        env.reset()
    assert env.reset(seed=3) == pt.PlaygroundText(seed=3).reset()
    assert pt.PlaygroundText(seed=3).reset() == pt.PlaygroundText().reset(seed=3)


def test_seeding_determinism_across_processes():
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_playground_text as t; print(t.trace_digest(5))"
    digests = set()
    for hash_seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        digests.add(out.stdout.strip())
    assert digests == {trace_digest(5)}


def vec_trace(seed, steps=300):
    vec = pt.SyncVecPlaygroundText(3, seed=seed, num_objects=4, goal_types=("grasp", "grow"))
    rng = random.Random(0)
    obs, infos = vec.reset()
    out = [tuple(obs), tuple(i["goal"] for i in infos)]
    for _ in range(steps):
        actions = [rng.choice(i["possible_actions"]) for i in infos]
        obs, rewards, term, trunc, infos = vec.step(actions)
        out.append((tuple(actions), tuple(obs), tuple(rewards), tuple(term), tuple(trunc), tuple(i["goal"] for i in infos)))
    return out


def test_seeding_determinism_vector_env():
    assert vec_trace(7) == vec_trace(7)
    assert vec_trace(7) != vec_trace(8)
    vec = pt.SyncVecPlaygroundText(3, seed=7)
    obs, infos = vec.reset(seed=50)
    for i in range(3):
        assert (obs[i], infos[i]) == pt.PlaygroundText(seed=pt.env_seed(50, i)).reset()


# --------------------------------------------------------------------------------------------------
# 8. Errors
# --------------------------------------------------------------------------------------------------
def _raises(exc, fn, *needles):
    with pytest.raises(exc) as err:
        fn()
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))


def test_value_errors_name_allowed_values():
    goal_types = ("grasp", "grow", "grow_then_grasp", "grow_then_grow")
    _raises(ValueError, lambda: pt.PlaygroundText(split="val"), "'val'", "train", "test")
    _raises(ValueError, lambda: pt.all_goals("validation"), "train", "test")
    _raises(ValueError, lambda: pt.PlaygroundText(goal_types="jump"), "jump", *goal_types)
    _raises(ValueError, lambda: pt.PlaygroundText(goal_types=["grasp", "fly"]), "fly", *goal_types)
    _raises(ValueError, lambda: pt.PlaygroundText(goal_types=[]), *goal_types)
    _raises(ValueError, lambda: pt.all_goals("train", "jump"), *goal_types)
    for bad in (0, 2, 21, -1, True, 6.0, "6", None):
        _raises(ValueError, lambda: pt.PlaygroundText(num_objects=bad), "3 to 20")
    _raises(ValueError, lambda: pt.PlaygroundText(num_objects=1, goal_types=("grasp", "grow")), "2 to 20")
    _raises(ValueError, lambda: pt.PlaygroundText(num_objects=0, goal_types="grasp"), "1 to 20")
    for ok in (1, 20):
        pt.PlaygroundText(num_objects=ok, goal_types="grasp").reset()
    _raises(ValueError, lambda: pt.PlaygroundText(num_objects=1, goal_types="grasp").reset(goal="Grow red cat"), "2")
    for goal in ("Grasp purple door", "Grow red cat then grasp red cat", "grasp red door", ""):
        _raises(ValueError, lambda: pt.goal_type(goal), "red, green, blue", "door", "living_thing", "all_goals")
        _raises(ValueError, lambda: pt.PlaygroundText().reset(goal=goal), "red, green, blue", "door")
    env = pt.PlaygroundText()
    for objects in (["purple door"], ["red door", "red door"], [], [f"{c} {t}" for t in FURNITURE for c in COLORS][:21]):
        _raises(ValueError, lambda: env.reset(goal="Grasp red door", objects=objects), "red, green, blue", "door", "water")
    _raises(ValueError, lambda: pt.SyncVecPlaygroundText(0), "positive integer")
    _raises(ValueError, lambda: pt.SyncVecPlaygroundText(2, num_objects=99), "3 to 20")
    vec = pt.SyncVecPlaygroundText(2, seed=0)
    _, infos = vec.reset()
    _raises(ValueError, lambda: vec.step([infos[0]["possible_actions"][0]]), "1 actions", "2 envs")


def test_invalid_actions_raise_and_change_nothing():
    env = pt.PlaygroundText()
    scene = ["red door", "blue water", "green mouse"]
    _, info = env.reset(goal="Grasp red door", objects=scene)
    possible = info["possible_actions"]

    def invalid(action, possible_now):
        with pytest.raises(ValueError) as err:
            env.step(action)
        assert repr(action) in str(err.value)
        for a in possible_now:
            assert a in str(err.value)

    for action in ("Grasp", "Release", "Go to purple door", "Go to red chair", "go to red door", "dance", ""):
        invalid(action, possible)
    obs, *_, info = env.step("Go to blue water")
    assert obs == obs_text(scene, on="blue water")
    invalid("Release", info["possible_actions"])
    obs, *_, info = env.step("Grasp")
    for action in ("Grasp", "Go to blue water"):
        invalid(action, info["possible_actions"])
    obs, *_, info = env.step("Go to green mouse")  # holding and standing on an object: still no Grasp
    for action in ("Grasp", "Go to blue water"):
        invalid(action, info["possible_actions"])
    assert obs == obs_text(["red door", "green mouse"], on="green mouse", holding="blue water")
    # Invalid attempts do not use up the horizon: exactly 6 valid steps, the 6th truncates.
    for t in range(4, 7):
        obs, r, term, trunc, info = env.step("Go to green mouse")
        assert (r, term, trunc) == (0.0, False, t == 6)
    _raises(RuntimeError, lambda: env.step("Release"), "reset")


def test_runtime_error_when_stepping_an_ended_episode():
    _raises(RuntimeError, lambda: pt.PlaygroundText().step("Grasp"), "reset")
    env = pt.PlaygroundText()
    env.reset(goal="Grasp red door", objects=["red door"])
    env.step("Go to red door")
    assert env.step("Grasp")[2] is True
    _raises(RuntimeError, lambda: env.step("Release"), "reset")
    _raises(RuntimeError, lambda: env.step("Go to red door"), "reset")
    env.reset(goal="Grasp red door", objects=["red door", "blue chair"])
    for t in range(1, 7):
        *_, trunc, _ = env.step("Go to blue chair")
        assert trunc == (t == 6)
    _raises(RuntimeError, lambda: env.step("Grasp"), "reset")
    obs, info = env.reset(goal="Grasp red door", objects=["red door"])  # reset works again
    assert env.step("Go to red door")[1] == 0.0


# --------------------------------------------------------------------------------------------------
# 9. The vector env's auto-reset contract
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, least_terminated", [(dict(num_objects=4, goal_types=("grasp", "grow")), 10), (dict(num_objects=6), 1)]
)
def test_vector_env_auto_reset_matches_single_envs(kwargs, least_terminated):
    n, seed = 5, 100
    vec = pt.SyncVecPlaygroundText(n, seed=seed, **kwargs)
    singles = [pt.PlaygroundText(seed=pt.env_seed(seed, i), **kwargs) for i in range(n)]
    fresh = [pt.PlaygroundText(seed=pt.env_seed(seed, i), **kwargs) for i in range(n)]  # only reset: the episode starts
    obs, infos = vec.reset()
    assert len(obs) == len(infos) == n
    for i in range(n):
        assert (obs[i], infos[i]) == singles[i].reset() == fresh[i].reset()
    rng = random.Random(0)
    ends = {"terminated": 0, "truncated": 0}
    for _ in range(800):
        actions = [rng.choice(info["possible_actions"]) for info in infos]
        obs, rewards, term, trunc, infos = vec.step(actions)
        assert isinstance(rewards, np.ndarray) and rewards.shape == (n,) and rewards.dtype == np.float32
        assert term.shape == trunc.shape == (n,) and term.dtype == trunc.dtype == np.bool_
        assert len(obs) == len(infos) == n
        for i in range(n):
            s_obs, s_r, s_term, s_trunc, s_info = singles[i].step(actions[i])
            assert (rewards[i], term[i], trunc[i]) == (s_r, s_term, s_trunc)
            if s_term or s_trunc:
                ends["terminated" if s_term else "truncated"] += 1
                assert infos[i]["final_observation"] == s_obs
                assert infos[i]["final_info"] == s_info
                assert (s_info["goal"] in s_info["achieved_goals"]) == s_term
                new_obs, new_info = singles[i].reset()
                assert (new_obs, new_info) == fresh[i].reset()
                assert obs[i] == new_obs
                assert infos[i] == {**new_info, "final_observation": s_obs, "final_info": s_info}
                assert set(infos[i]) == {"goal", "goal_type", "possible_actions", "horizon", "final_observation", "final_info"}
            else:
                assert (obs[i], infos[i]) == (s_obs, s_info)
                assert "final_observation" not in infos[i] and "final_info" not in infos[i]
    assert ends["terminated"] >= least_terminated and ends["truncated"] > 10


def test_vector_env_scripted_final_observation():
    vec = pt.SyncVecPlaygroundText(2, seed=0, num_objects=1, goal_types="grasp")
    obs, infos = vec.reset()
    targets = [parse(o)["see"][0] for o in obs]
    assert all(describes(info["goal"], t) for info, t in zip(infos, targets))
    obs, rewards, term, trunc, infos = vec.step([f"Go to {t}" for t in targets])
    assert rewards.tolist() == [0.0, 0.0] and term.tolist() == trunc.tolist() == [False, False]
    assert "final_observation" not in infos[0]
    obs, rewards, term, trunc, infos = vec.step(["Grasp", f"Go to {targets[1]}"])
    assert rewards.tolist() == [1.0, 0.0] and term.tolist() == [True, False] and trunc.tolist() == [False, False]
    assert infos[0]["final_observation"] == obs_text([], holding=targets[0])
    assert (
        infos[0]["final_info"]["achieved_goals"] and infos[0]["final_info"]["goal"] in infos[0]["final_info"]["achieved_goals"]
    )
    assert parse(obs[0])["holding"] is None and parse(obs[0])["on"] is None
    single = pt.PlaygroundText(num_objects=1, goal_types="grasp", seed=pt.env_seed(0, 0))
    single.reset()
    assert (obs[0], {k: v for k, v in infos[0].items() if not k.startswith("final_")}) == single.reset()


# --------------------------------------------------------------------------------------------------
# 10. Independent seeds and atomic vector steps
# --------------------------------------------------------------------------------------------------
def reset_stream(env, episodes=50):
    """What an env's rng decides: the goal and scene of its next episodes (the rng is used at reset only)."""
    return [env.reset() for _ in range(episodes)]


def test_run_seeds_share_no_env_stream():
    # With seed + i, SyncVec(32, seed=1).envs[1] replayed SyncVec(32, seed=2).envs[0]: 31 of 32 streams shared.
    runs = [pt.SyncVecPlaygroundText(32, seed=s, num_objects=3, goal_types=("grasp", "grow")) for s in (1, 2, 3)]
    streams = [repr(reset_stream(env, 20)) for vec in runs for env in vec.envs]
    assert len(set(streams)) == len(streams) == 96
    # Evaluation envs (stream 1) share no stream with the training envs of the same seed.
    evals = pt.SyncVecPlaygroundText(32, seed=1, stream=1, num_objects=3, goal_types=("grasp", "grow"))
    assert not {repr(reset_stream(env, 20)) for env in evals.envs} & set(streams)


def test_env_seeds_follow_the_global_index_not_the_process_count():
    # torchrun: rank r builds envs first_index = r * envs_per_rank ...; together they are the one-process envs.
    whole = pt.SyncVecPlaygroundText(4, seed=9)
    halves = [pt.SyncVecPlaygroundText(2, seed=9, first_index=2 * r) for r in range(2)]
    assert [reset_stream(e, 5) for e in whole.envs] == [reset_stream(e, 5) for h in halves for e in h.envs]
    assert pt.env_seed(9, 3) == pt.env_seed(9, 3) != pt.env_seed(9, 3, stream=1)
    assert len({pt.env_seed(s, i) for s in range(50) for i in range(50)}) == 2500
    for bad in (-1, 1.5, "1", True):
        _raises(ValueError, lambda: pt.SyncVecPlaygroundText(2, seed=bad), "non-negative integer")
    # reset(seed=...) of a single env stays exact: Python's random.Random(seed).
    assert pt.PlaygroundText(seed=4).reset() == pt.PlaygroundText().reset(seed=4)


def test_vector_step_with_an_invalid_action_moves_no_env():
    vec = pt.SyncVecPlaygroundText(3, seed=0, num_objects=3, goal_types=("grasp", "grow"))
    obs, infos = vec.reset()
    valid = [info["possible_actions"][0] for info in infos]
    before = [(env._on, env._held, env._t, env._observation()) for env in vec.envs]
    for bad in (1, 2):
        actions = list(valid)
        actions[bad] = "Fly away"
        _raises(ValueError, lambda: vec.step(actions), f"env {bad}", "'Fly away'", *infos[bad]["possible_actions"])
        assert [(env._on, env._held, env._t, env._observation()) for env in vec.envs] == before
    obs2, *_ = vec.step(valid)  # the same step, now valid, moves every env
    assert all(env._t == 1 for env in vec.envs) and obs2 != obs


def _roll(vec: pt.SyncVecPlaygroundText, obs: list[str], infos: list[dict], steps: int, rng: random.Random) -> list:
    """Random valid actions for `steps` steps: everything the vector env returns, in order."""
    trace = [(obs, infos)]
    for _ in range(steps):
        out = vec.step([rng.choice(info["possible_actions"]) for info in infos])
        obs, infos = out[0], out[4]
        trace.append((obs, out[1].tolist(), out[2].tolist(), out[3].tolist(), infos))
    return trace


@pytest.mark.parametrize("goal_types", [pt.GOAL_TYPES, ("grasp", "grow")])
def test_state_dict_resumes_exactly_through_plain_data(tmp_path, goal_types):
    """A vector env saved mid-episode (through torch.load(weights_only=True): plain data only) and loaded into envs
    built with another seed continues exactly as the original: observations, rewards, ends, achieved goals and
    the auto-reset's random episodes, over many random episodes; a never-reset env round-trips too."""
    import torch

    kwargs = dict(num_objects=6 if len(goal_types) > 2 else 3, goal_types=goal_types)
    successes = 0
    for trial in range(8):
        vec = pt.SyncVecPlaygroundText(4, seed=trial, **kwargs)
        obs, infos = vec.reset()
        actions = random.Random(trial)
        last = _roll(vec, obs, infos, 1 + actions.randrange(40), actions)[-1]
        obs, infos = last[0], last[-1]
        torch.save(vec.state_dict(), tmp_path / "env.pt")
        copy = pt.SyncVecPlaygroundText(4, seed=1000 + trial, **kwargs)
        copy.reset()
        copy.load_state_dict(torch.load(tmp_path / "env.pt", weights_only=True))
        state = actions.getstate()
        expected = _roll(vec, obs, infos, 120, actions)
        actions.setstate(state)
        assert _roll(copy, obs, infos, 120, actions) == expected
        assert sum(sum(te) + sum(tr) for _, _, te, tr, _ in expected[1:]) > 0  # episodes ended and auto-reset
        successes += sum(sum(te) for _, _, te, _, _ in expected[1:])
    assert successes > 0
    fresh, copy = pt.PlaygroundText(seed=3, **kwargs), pt.PlaygroundText(seed=4, **kwargs)
    copy.load_state_dict(fresh.state_dict())
    assert fresh.reset() == copy.reset()
    with pytest.raises(ValueError, match="3 envs for 4 envs"):
        pt.SyncVecPlaygroundText(4, seed=0, **kwargs).load_state_dict(vec.state_dict()[:3])
