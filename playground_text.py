"""Playground-Text: the text environment of SAC-GLAM (Section 3 and Appendix A of the paper).

A scene holds N objects named "<color> <type>". The agent moves onto an object with "Go to <object>",
picks up the object it stands on with "Grasp" and puts the held object down with "Release". Water
grows a plant; water or food grows an animal. Goals follow the grammar of the original Playground
(Colas et al. 2020): "Grasp ...", "Grow ...", and the sequential "Grow ... then grasp/grow ...".

The observation is the whole state in text, without the goal; `format_prompt(goal, observation)`
renders the prompt of Figure 3, so any transition can be re-rendered under another goal (HER).
A social partner lists, at every step, every goal description newly achieved (`info["achieved_goals"]`).

Pure Python and fast (see benchmarks/env_throughput.py): env time must stay negligible next to the LLM.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

# --------------------------------------------------------------------------------------------------
# World: 32 object types in four categories, three colors (colors never change the dynamics)
# --------------------------------------------------------------------------------------------------
CATEGORIES = {
    "furniture": ("door", "chair", "desk", "lamp", "table", "cupboard", "sink", "window", "sofa", "carpet"),
    "plant": ("cactus", "carnivorous", "flower", "tree", "bush", "grass", "algae", "tea", "rose", "bonsai"),
    "animal": ("dog", "cat", "chameleon", "human", "fly", "parrot", "mouse", "lion", "pig", "cow"),
    "supply": ("food", "water"),
}
COLORS = ("red", "green", "blue")
TYPES = tuple(t for types in CATEGORIES.values() for t in types)
CATEGORY_OF = {t: c for c, types in CATEGORIES.items() for t in types}
LIVING_TYPES = CATEGORIES["plant"] + CATEGORIES["animal"]
# What grows what (Appendix A): water grows plants and animals, food grows animals only.
GROWERS = {"plant": ("water",), "animal": ("water", "food")}
OBJECT_NAMES = tuple(f"{c} {t}" for t in TYPES for c in COLORS)

GOAL_TYPES = ("grasp", "grow", "grow_then_grasp", "grow_then_grow")
SPLITS = ("train", "test")
# Upper bound of the optimal plan length from a fresh scene (agent on nothing, holding nothing):
# grasp = go to + grasp; grow = go to supply + grasp + go to target + release; sequential = sum.
PLAN_LENGTH = {"grasp": 2, "grow": 4, "grow_then_grasp": 6, "grow_then_grow": 8}
HORIZON_FACTOR = 3
# The episode is truncated after HORIZON_FACTOR x the optimal plan length: 6, 12, 18, 24 steps.
HORIZON = {g: HORIZON_FACTOR * n for g, n in PLAN_LENGTH.items()}
# Smallest scene that can hold every goal of a type (target, supply, second target).
MIN_OBJECTS = {"grasp": 1, "grow": 2, "grow_then_grasp": 3, "grow_then_grow": 3}
MAX_OBJECTS = 20

# --------------------------------------------------------------------------------------------------
# Goal grammar (original Playground): names = 32 types + 5 category words, adjectives = 3 colors
# --------------------------------------------------------------------------------------------------
_CATEGORY_WORDS = ("furniture", "plant", "animal", "supply", "living_thing")
_GRASP_NAMES = TYPES + _CATEGORY_WORDS
_GROW_NAMES = LIVING_TYPES + ("animal", "plant", "living_thing")


def _simple_descriptions(verb: str, names: Sequence[str]) -> list[str]:
    return (
        [f"{verb} {c} {n}" for c in COLORS for n in names]
        + [f"{verb} any {c} thing" for c in COLORS]
        + [f"{verb} any {n}" for n in names]
    )


def _is_held_out(description: str) -> bool:
    """The original Playground's test set: goals that mention any of these attribute combinations."""
    if any(s in description for s in ("red tree", "green dog", "blue door", "flower")):
        return True
    for c in COLORS + ("any",):
        if f"Grasp {c} animal" in description or f"Grasp {c} fly" in description:
            return True
        for p in CATEGORIES["plant"] + ("plant", "living_thing"):
            if f"Grow {c} {p}" in description:
                return True
    return False


def _tail(description: str) -> str:
    return description.rsplit(" ", 2)[-2] + " " + description.rsplit(" ", 1)[-1]


def _sequential(grow_a: Iterable[str], goals_b: Iterable[str]) -> list[str]:
    # "Grow red cat then grasp red cat" is excluded: A and B may not end with the same two words.
    goals_b = list(goals_b)
    return [f"{a} then {b[0].lower()}{b[1:]}" for a in grow_a for b in goals_b if _tail(a) != _tail(b)]


def _build_goal_space() -> dict[tuple[str, str], tuple[str, ...]]:
    grasp = _simple_descriptions("Grasp", _GRASP_NAMES)
    grow = _simple_descriptions("Grow", _GROW_NAMES)
    space = {}
    for split, keep in (("train", lambda d: not _is_held_out(d)), ("test", _is_held_out)):
        space[split, "grasp"] = tuple(d for d in grasp if keep(d))
        space[split, "grow"] = tuple(d for d in grow if keep(d))
    train_grow, train_grasp = space["train", "grow"], space["train", "grasp"]
    # Sequential goals chain two training goals; every other chain (any held-out part) is a test goal.
    space["train", "grow_then_grasp"] = tuple(_sequential(train_grow, train_grasp))
    space["train", "grow_then_grow"] = tuple(_sequential(train_grow, train_grow))
    for kind, goals_b in (("grow_then_grasp", grasp), ("grow_then_grow", grow)):
        train = set(space["train", kind])
        space["test", kind] = tuple(g for g in _sequential(grow, goals_b) if g not in train)
    return space


_GOAL_SPACE = _build_goal_space()
_GOAL_TYPE_OF = {g: kind for (_, kind), goals in _GOAL_SPACE.items() for g in goals}


def all_goals(split: str = "train", goal_types: str | Iterable[str] = GOAL_TYPES) -> list[str]:
    """Every goal description of a split ("train": 8,470 goals, "test": the held-out ones) and goal types."""
    split, goal_types = _check_split(split), _check_goal_types(goal_types)
    return [g for kind in goal_types for g in _GOAL_SPACE[split, kind]]


def goal_type(goal: str) -> str:
    """The type of a goal description: grasp, grow, grow_then_grasp or grow_then_grow."""
    kind = _GOAL_TYPE_OF.get(goal)
    if kind is None:
        raise ValueError(
            f"unknown goal {goal!r}: goals are 'Grasp|Grow <color> <name>', 'Grasp|Grow any <color> thing', "
            "'Grasp|Grow any <name>' and '<Grow goal> then <grasp|grow goal>' (see all_goals('train'), "
            "all_goals('test')); colors: "
            + ", ".join(COLORS)
            + "; grasp names: "
            + ", ".join(_GRASP_NAMES)
            + "; grow names: "
            + ", ".join(_GROW_NAMES)
        )
    return kind


def format_prompt(goal: str, observation: str) -> str:
    """The prompt of Figure 3: goal, then the observation, then "Action:" for the actor to continue."""
    return f"Goal: {goal}\n{observation}\nAction:"


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: allowed splits are {', '.join(SPLITS)}")
    return split


def _check_seed(seed) -> None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise ValueError(f"seed={seed!r}: give a non-negative integer (or None)")


def _check_goal_types(goal_types: str | Iterable[str]) -> tuple[str, ...]:
    goal_types = (goal_types,) if isinstance(goal_types, str) else tuple(goal_types)
    bad = [g for g in goal_types if g not in GOAL_TYPES]
    if bad or not goal_types:
        raise ValueError(f"unknown goal types {bad or '(none given)'}: choose one or more of {', '.join(GOAL_TYPES)}")
    return tuple(dict.fromkeys(goal_types))


# --------------------------------------------------------------------------------------------------
# Social partner: every description an event achieves, with all its synonyms
# --------------------------------------------------------------------------------------------------
def _event_descriptions(verb: str, name: str) -> tuple[str, ...]:
    color, kind = name.split(" ")
    category = CATEGORY_OF[kind]
    names = [kind, category] + (["living_thing"] if kind in LIVING_TYPES else [])
    return tuple([f"{verb} {color} {n}" for n in names] + [f"{verb} any {n}" for n in names] + [f"{verb} any {color} thing"])


_GRASPED = {n: _event_descriptions("Grasp", n) for n in OBJECT_NAMES}
_GROWN = {n: _event_descriptions("Grow", n) for n in OBJECT_NAMES if n.split(" ")[1] in LIVING_TYPES}
# Second halves of sequential goals: lower-cased verb, and the two-word tail that must differ from A's.
_AS_SECOND = {d: (d[0].lower() + d[1:], _tail(d)) for ds in (*_GRASPED.values(), *_GROWN.values()) for d in ds}
_TAIL = {d: _tail(d) for ds in _GROWN.values() for d in ds}


def _matching_objects(description: str) -> tuple[str, ...]:
    """Object names that achieve a simple description (for grow: living ones only)."""
    table = _GRASPED if description.startswith("Grasp") else _GROWN
    return tuple(n for n, ds in table.items() if description in ds)


_MATCHES = {d: _matching_objects(d) for d in set(_AS_SECOND)}


# --------------------------------------------------------------------------------------------------
# The environment
# --------------------------------------------------------------------------------------------------
class PlaygroundText:
    """One Playground-Text episode at a time, gymnasium-style (reset/step), with text observations.

    Actions: "Go to <object>" for every object not held, "Grasp" when standing on an object with empty
    hands, "Release" when holding one. After a release the agent stands on the released object.
    """

    def __init__(
        self,
        num_objects: int = 6,
        goal_types: str | Iterable[str] = GOAL_TYPES,
        split: str = "train",
        seed: int | None = None,
    ):
        self.split = _check_split(split)
        self.goal_types = _check_goal_types(goal_types)
        low = max(MIN_OBJECTS[g] for g in self.goal_types)
        if isinstance(num_objects, bool) or not isinstance(num_objects, int) or not low <= num_objects <= MAX_OBJECTS:
            raise ValueError(
                f"num_objects={num_objects!r} is out of range: with goal types {', '.join(self.goal_types)} "
                f"it must be an integer from {low} to {MAX_OBJECTS}"
            )
        self.num_objects = num_objects
        self.goals = all_goals(self.split, self.goal_types)
        self._rng = random.Random(seed)
        self._names: list[str] = []
        self._over = True

    # -- episode ------------------------------------------------------------------------------------
    def reset(self, seed: int | None = None, goal: str | None = None, objects: Sequence[str] | None = None):
        """Start an episode. `goal` forces a goal (any train or test goal); `objects` forces the scene
        (for scripted tests and demos: the names are used as given, in that order)."""
        if seed is not None:
            self._rng.seed(seed)
        if goal is None:
            goal = self._rng.choice(self.goals)
        kind = goal_type(goal)
        if objects is None:
            if self.num_objects < MIN_OBJECTS[kind]:
                raise ValueError(f"goal {goal!r} needs at least {MIN_OBJECTS[kind]} objects, the scene has {self.num_objects}")
            names = self._sample_scene(goal, kind)
        else:
            names = list(objects)
            bad = [n for n in names if n not in _GRASPED]
            if bad or len(set(names)) != len(names) or not 1 <= len(names) <= MAX_OBJECTS:
                raise ValueError(
                    f"objects {names!r}: give 1 to {MAX_OBJECTS} distinct names '<color> <type>' with colors "
                    f"{', '.join(COLORS)} and types {', '.join(TYPES)}" + (f" (unknown: {bad})" if bad else "")
                )
        self._begin(goal, names)
        info = {"goal": goal, "goal_type": kind, "possible_actions": self._possible_actions(), "horizon": self.horizon}
        return self._observation(), info

    def _begin(self, goal: str, names: list[str]):
        """The state at the start of an episode with this goal and scene."""
        self.goal, self.goal_kind = goal, goal_type(goal)
        self.horizon = HORIZON[self.goal_kind]
        self._names = names
        self._go = [f"Go to {n}" for n in names]
        self._index = {a: i for i, a in enumerate(self._go)}
        self._on = self._held = -1
        self._grown: list[int] = []
        self._achieved: set[str] = set()
        self._grow_history: list[str] = []  # grow descriptions achieved at earlier steps (sequential goals)
        self._t = 0
        self._over = False
        self._refresh_visible()

    def check_action(self, action: str) -> None:
        """Raise, changing nothing, unless `action` can be taken now (SyncVecPlaygroundText checks all envs first)."""
        if self._over:
            raise RuntimeError("the episode is over: call reset() before step()")
        held, on = self._held, self._on
        if action == "Grasp":
            ok = on >= 0 and held < 0
        elif action == "Release":
            ok = held >= 0
        else:
            i = self._index.get(action, -1)
            ok = i >= 0 and i != held
        if not ok:
            raise ValueError(f"invalid action {action!r}: possible actions are {self._possible_actions()}")

    def step(self, action: str):
        self.check_action(action)
        held, on = self._held, self._on
        grasped = grown = None
        if action == "Grasp":
            self._held, self._on, grasped = on, -1, self._names[on]
            self._refresh_visible()
        elif action == "Release":
            if on >= 0:
                grown = self._meet(held, on)
            self._held, self._on = -1, held
            self._refresh_visible()
        else:
            self._on = self._index[action]
        self._t += 1
        achieved = self._social_partner(grasped, grown) if grasped or grown else []
        terminated = self.goal in achieved
        truncated = not terminated and self._t >= self.horizon
        self._over = terminated or truncated
        info = {"goal": self.goal, "possible_actions": self._possible_actions(), "achieved_goals": achieved}
        info["success"] = terminated  # the goal reached: the only way an episode terminates here
        return self._observation(), float(terminated), terminated, truncated, info

    # -- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The env's whole state as plain data (ints, strings, lists, tuples): load_state_dict continues from it
        exactly, random draws included."""
        state = {"rng": self._rng.getstate(), "over": self._over}
        if self._names:  # an episode has begun
            state["episode"] = {
                "goal": self.goal,
                "names": list(self._names),
                "on": self._on,
                "held": self._held,
                "grown": list(self._grown),
                "achieved": sorted(self._achieved),
                "grow_history": list(self._grow_history),
                "t": self._t,
            }
        return state

    def load_state_dict(self, state: dict):
        self._rng.setstate(state["rng"])
        if "episode" in state:
            episode = state["episode"]
            self._begin(episode["goal"], list(episode["names"]))
            self._on, self._held, self._t = episode["on"], episode["held"], episode["t"]
            self._grown, self._achieved = list(episode["grown"]), set(episode["achieved"])
            self._grow_history = list(episode["grow_history"])
            self._refresh_visible()
        self._over = state["over"]

    # -- rules --------------------------------------------------------------------------------------
    def _meet(self, a: int, b: int) -> str | None:
        """Object a is released on object b: a living thing grows when its supply meets it, either way."""
        for target, supply in ((a, b), (b, a)):
            kind = self._names[target].split(" ")[1]
            if target not in self._grown and kind in LIVING_TYPES:
                if self._names[supply].split(" ")[1] in GROWERS[CATEGORY_OF[kind]]:
                    self._grown.append(target)
                    return self._names[target]
        return None

    def _social_partner(self, grasped: str | None, grown: str | None) -> list[str]:
        events = _GRASPED[grasped] if grasped else _GROWN[grown]
        new = [d for d in events if d not in self._achieved]
        # "A then B": B happens now, A was achieved at an earlier step of this episode (order matters).
        for a in self._grow_history:
            tail_a = _TAIL[a]
            for b in events:
                second, tail_b = _AS_SECOND[b]
                if tail_a != tail_b:
                    seq = f"{a} then {second}"
                    if seq not in self._achieved:
                        new.append(seq)
        self._achieved.update(new)
        if grown:
            self._grow_history.extend(d for d in events if d not in self._grow_history)
        return new

    # -- text ---------------------------------------------------------------------------------------
    def _refresh_visible(self):
        held = self._held
        self._see = ", ".join(n for i, n in enumerate(self._names) if i != held) or "nothing"
        self._go_actions = [a for i, a in enumerate(self._go) if i != held]

    def _possible_actions(self) -> list[str]:
        if self._held >= 0:
            return self._go_actions + ["Release"]
        if self._on >= 0:
            return self._go_actions + ["Grasp"]
        return list(self._go_actions)

    def _observation(self) -> str:
        names = self._names
        on = names[self._on] if self._on >= 0 else "nothing"
        held = names[self._held] if self._held >= 0 else "nothing"
        grown = ", ".join(names[i] for i in self._grown) if self._grown else "nothing"
        return f"You see: {self._see}\nYou are on: {on}\nYou are holding: {held}\nYou have grown: {grown}"

    def _sample_scene(self, goal: str, kind: str) -> list[str]:
        """What the goal names (distinct objects for its two parts), a supply that grows every grow
        target of the goal, then random distractors; shuffled."""
        rng = self._rng
        first, _, second = goal.partition(" then ")
        parts = [first] + ([second[0].upper() + second[1:]] if second else [])
        while True:
            targets = [rng.choice(_MATCHES[p]) for p in parts]
            if len(set(targets)) == len(targets):
                break
        names = list(targets)
        grow_targets = [t for p, t in zip(parts, targets) if p.startswith("Grow")]
        if grow_targets:
            supplies = set(GROWERS["plant"] + GROWERS["animal"])
            for t in grow_targets:
                supplies &= set(GROWERS[CATEGORY_OF[t.split(" ")[1]]])
            if not any(n.split(" ")[1] in supplies for n in names):
                names.append(rng.choice([f"{c} {s}" for s in sorted(supplies) for c in COLORS]))
        taken = set(names)
        while len(names) < self.num_objects:
            n = rng.choice(OBJECT_NAMES)
            if n not in taken:
                taken.add(n)
                names.append(n)
        rng.shuffle(names)
        return names


def env_seed(seed: int, index: int, stream: int = 0) -> int:
    """Seed of env `index` of a vector env seeded with `seed`, from numpy's SeedSequence (128 bits).

    Runs with different seeds share no env stream (with seed + index, env 1 of seed 1 would replay env 0
    of seed 2), and `stream` separates the env families of one run (the scripts: 0 training, 1 evaluation).
    """
    words = np.random.SeedSequence(seed, spawn_key=(stream, index)).generate_state(4, np.uint32)
    return int.from_bytes(words.tobytes(), "little")


class SyncVecPlaygroundText:
    """N PlaygroundText envs stepped in lockstep, with auto-reset.

    When env i's episode ends at a step, `observations[i]` and `infos[i]` are those of its next episode
    (goal, goal_type, possible_actions), and `infos[i]["final_observation"]` / `infos[i]["final_info"]`
    hold the last observation and step info of the episode that ended, so n-step returns and HER see
    the true last state. Env i is seeded with env_seed(seed, first_index + i, stream): under torchrun a
    rank passes the global index of its first env, so envs do not depend on the process count.
    A step with an invalid action raises before any env moves.
    """

    def __init__(self, num_envs: int, seed: int | None = None, first_index: int = 0, stream: int = 0, **env_kwargs):
        if isinstance(num_envs, bool) or not isinstance(num_envs, int) or num_envs < 1:
            raise ValueError(f"num_envs={num_envs!r}: give a positive integer")
        _check_seed(seed)
        self.num_envs, self.first_index, self.stream = num_envs, first_index, stream
        self.envs = [PlaygroundText(seed=self._seed(seed, i), **env_kwargs) for i in range(num_envs)]
        self.max_actions = self.envs[0].num_objects + 1  # a "Go to" per object and Grasp or Release

    @functools.cached_property
    def _training_goals(self) -> frozenset[str]:
        return frozenset(all_goals("train", self.envs[0].goal_types))

    def relabels(self, goal: str) -> bool:
        """Whether HER may relabel with this goal: a training goal of these envs' goal types (no held-out one)."""
        return goal in self._training_goals

    def _seed(self, seed: int | None, i: int) -> int | None:
        return None if seed is None else env_seed(seed, self.first_index + i, self.stream)

    def reset(self, seed: int | None = None):
        _check_seed(seed)
        results = [env.reset(seed=self._seed(seed, i)) for i, env in enumerate(self.envs)]
        return [r[0] for r in results], [r[1] for r in results]

    def state_dict(self) -> list[dict]:
        """Every env's state as plain data (PlaygroundText.state_dict), for checkpoints."""
        return [env.state_dict() for env in self.envs]

    def load_state_dict(self, states: list[dict]):
        if len(states) != self.num_envs:
            raise ValueError(f"got the states of {len(states)} envs for {self.num_envs} envs")
        for env, state in zip(self.envs, states):
            env.load_state_dict(state)

    def step(self, actions: Sequence[str]):
        if len(actions) != self.num_envs:
            raise ValueError(f"got {len(actions)} actions for {self.num_envs} envs: give one action per env")
        for i, (env, action) in enumerate(zip(self.envs, actions)):  # all valid, or no env moves
            try:
                env.check_action(action)
            except ValueError as err:
                raise ValueError(f"env {i}: {err}") from None
        observations, infos = [], []
        rewards = np.zeros(self.num_envs, dtype=np.float32)
        terminated = np.zeros(self.num_envs, dtype=bool)
        truncated = np.zeros(self.num_envs, dtype=bool)
        for i, (env, action) in enumerate(zip(self.envs, actions)):
            obs, rewards[i], terminated[i], truncated[i], info = env.step(action)
            if terminated[i] or truncated[i]:
                final_obs, final_info = obs, info
                obs, info = env.reset()
                info["final_observation"], info["final_info"] = final_obs, final_info
            observations.append(obs)
            infos.append(info)
        return observations, rewards, terminated, truncated, infos


# --------------------------------------------------------------------------------------------------
# What the training scripts use (docs/adapting.md): the run name, the options, the vector env
# --------------------------------------------------------------------------------------------------
NAME = "PlaygroundText"


@dataclass
class Options:
    """The env's options: the training scripts take them as flags (--num-objects, --goal-types) and pass them on."""

    num_objects: int = 6
    """objects per scene (Appendix A: 6; the simplified env of Appendix B: 3)"""
    goal_types: tuple[str, ...] = GOAL_TYPES
    """goal types to train on (the simplified env of Appendix B: grasp grow)"""


def vector_env(
    num_envs: int, seed: int | None, first_index: int = 0, split: str = "train", stream: int = 0, **options
) -> SyncVecPlaygroundText:
    """The training scripts' envs: num_envs envs of a split, with Options' fields as keyword arguments."""
    return SyncVecPlaygroundText(num_envs, seed, first_index, stream, split=split, **options)
