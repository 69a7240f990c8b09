"""BabyAI-Text: minigrid's BabyAI levels as a text environment for the SAC-GLAM scripts (GLAM's setting).

The agent reads its egocentric 7x7 partial view in text ("You see a red ball 2 steps forward and 1 step left")
and acts with GLAM's six actions: turn left, turn right, go forward, pick up, drop, toggle. The observation
holds no goal; `format_prompt(goal, observation)` adds it, so any transition can be re-rendered under another
goal (HER). A social partner lists at every step the missions newly achieved (`info["achieved_goals"]`).

Supported levels (`LEVELS`): levels whose mission is one GoTo or PickUp instruction about a ball, box or key,
where the partner can list exactly the missions minigrid's verifier would accept (a sequence or "and" mission
would need the order of its parts; Open and PutNext are other verbs; GoToRedBall* have one fixed mission, so
no held-out split). Another level of one such instruction (e.g. a GoToLocalS*N* size) needs only its entry.

Splits: a mission is a test mission when it names one of the held-out (color, type) pairs of `HELD_OUT`
("red ball", ...): every color and every type is seen in training, only these combinations are new. Missions
that name a color or a type alone ("pick up a ball") are training missions. A split's env resamples the level
until the mission falls in it.

Use it in place of Playground-Text: in a script, `import babyai_text as textenv`, then e.g.
`PYTHONPATH=examples python sac_glam_her.py --level BabyAI-PickupLoc-v0`.
"""

from __future__ import annotations

import contextlib
import io
from collections import Counter
from dataclasses import dataclass, fields
from typing import NamedTuple, Sequence

import numpy as np

try:
    import gymnasium as gym
    import minigrid  # noqa: F401  (importing it registers the BabyAI levels with gymnasium)
    from minigrid.core.constants import COLOR_NAMES, DIR_TO_VEC, IDX_TO_COLOR, IDX_TO_OBJECT
except ImportError as err:
    raise ImportError("babyai_text needs minigrid and gymnasium: pip install minigrid") from err

from playground_text import env_seed  # the same seeding as Playground-Text (seed, env index, stream)

NAME = "BabyAI"
SPLITS = ("train", "test")
GOAL_TYPES = ("go_to", "pick_up")  # the missions' verbs, as identifiers (the scripts make log tags of them)
# GLAM's action names, in minigrid's order (actions 0-5; "done" is never needed by these levels).
ACTIONS = ("turn left", "turn right", "go forward", "pick up", "drop", "toggle")
ACTION_INDEX = {a: i for i, a in enumerate(ACTIONS)}
PICKUP = 3

OBJECT_TYPES = ("ball", "box", "key")  # what these levels' missions name (doors and walls never)
COLORS = tuple(COLOR_NAMES)
# Each color once, each type twice: the test split asks for combinations never seen in training.
HELD_OUT = ("red ball", "green key", "blue box", "purple ball", "yellow key", "grey box")
# Object locations relative to the agent's start (minigrid's LOC_NAMES, in its order), as missions say them.
LOCATIONS = {"left": " on your left", "right": " on your right", "front": " in front of you", "behind": " behind you"}


class Grammar(NamedTuple):
    """What a level's mission generator can say about an object: minigrid's ObjDesc(type, color, loc)."""

    verb: str
    any_color: bool  # the color may be left out ("pick up a ball")
    any_type: bool  # the type may be left out ("pick up the red object")
    locations: bool  # "... on your left", relative to the agent's start


LEVELS = {
    "BabyAI-GoToObj-v0": Grammar("go to", False, False, False),  # one object in a room
    "BabyAI-GoToLocal-v0": Grammar("go to", False, False, False),  # one room, 8 objects
    "BabyAI-GoTo-v0": Grammar("go to", False, False, False),  # 3x3 rooms with doors, 18 objects
    "BabyAI-Pickup-v0": Grammar("pick up", False, False, False),  # 3x3 rooms with doors, 18 objects
    "BabyAI-PickupDist-v0": Grammar("pick up", True, True, False),  # one room, 5 objects
    "BabyAI-PickupDistDebug-v0": Grammar("pick up", True, True, False),  # the same; a wrong pickup ends in failure
    "BabyAI-PickupLoc-v0": Grammar("pick up", True, False, True),  # one room, 8 objects, locations
}


@dataclass
class Options:
    """BabyAI-Text's options (command-line flags of the scripts)."""

    level: str = "BabyAI-GoToLocal-v0"
    """the BabyAI level: BabyAI-GoToObj-v0, BabyAI-GoToLocal-v0, BabyAI-GoTo-v0, BabyAI-Pickup-v0,
    BabyAI-PickupDist-v0, BabyAI-PickupDistDebug-v0 or BabyAI-PickupLoc-v0"""


def _check_level(level: str) -> Grammar:
    if level not in LEVELS:
        raise ValueError(
            f"unknown level {level!r}: --level must be one of {', '.join(LEVELS)} "
            "(levels whose missions are a single GoTo or PickUp instruction)"
        )
    return LEVELS[level]


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: allowed splits are {', '.join(SPLITS)}")
    return split


def _check_index(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name}={value!r}: give a non-negative integer")


def is_held_out(mission: str) -> bool:
    """Is this a test mission (one that names a held-out color and type)?"""
    return any(pair in mission for pair in HELD_OUT)


def _surface(verb: str, kind: str | None, color: str | None, loc: str | None, count: int) -> str:
    """A mission as minigrid's ObjDesc.surface words it: "the" when one object of the layout matches, else "a"."""
    name = kind or "object"
    name = f"{color} {name}" if color else name
    return f"{verb} {'the' if count == 1 else 'a'} {name}{LOCATIONS[loc] if loc else ''}"


def all_missions(level: str, split: str = "train") -> list[str]:
    """Every mission string of a level's grammar in a split (both articles; not all occur in every layout)."""
    grammar, split = _check_level(level), _check_split(split)
    kinds = OBJECT_TYPES + ((None,) if grammar.any_type else ())
    colors = COLORS + ((None,) if grammar.any_color else ())
    locs = (None, *LOCATIONS) if grammar.locations else (None,)
    missions = [
        _surface(grammar.verb, kind, color, loc, count)
        for kind in kinds
        for color in colors
        if kind or color
        for loc in locs
        for count in (1, 2)
    ]
    return [m for m in missions if is_held_out(m) == (split == "test")]


def goal_type(goal: str) -> str:
    """The type of a mission, from its verb: go_to ("go to ...") or pick_up ("pick up ...")."""
    for kind in GOAL_TYPES:
        if goal.startswith(kind.replace("_", " ") + " "):
            return kind
    raise ValueError(f"unknown goal {goal!r}: BabyAI-Text missions start with 'go to' or 'pick up'")


def format_prompt(goal: str, observation: str) -> str:
    """The prompt: goal, then the observation, then "Action:" for the actor to continue."""
    return f"Goal: {goal}\n{observation}\nAction:"


# --------------------------------------------------------------------------------------------------
# Text observation
# --------------------------------------------------------------------------------------------------
def _steps(n: int, direction: str) -> str:
    return f"{n} step{'s' if n > 1 else ''} {direction}"


def _where(forward: int, right: int) -> str:
    parts = [_steps(forward, "forward")] if forward else []
    if right:
        parts.append(_steps(abs(right), "right" if right > 0 else "left"))
    return " and ".join(parts)


def _thing(kind: str, color: str, state: int) -> str:
    if kind == "door":
        return f"{('an open', 'a closed', 'a locked')[state]} {color} door"
    return f"a {color} {kind}"


def describe(image: np.ndarray) -> str:
    """The agent's view in text, from minigrid's gen_obs()["image"] (the agent at the bottom middle, facing up).

    One line per visible object, nearest row first and left to right; of the walls only the nearest straight
    ahead, left and right (a room's whole outline would fill the prompt); then what the agent carries.
    """
    width, height = image.shape[:2]
    ax, ay = width // 2, height - 1
    seen, walls = [], {}
    for i, j in zip(*np.nonzero(image[:, :, 0] > 1)):  # 0: unseen, 1: empty
        kind, forward, right = IDX_TO_OBJECT[int(image[i, j, 0])], ay - int(j), int(i) - ax
        if (forward, right) == (0, 0):
            continue  # the agent's own cell shows what it carries
        if kind == "wall":
            if forward == 0 or right == 0:  # straight ahead, left or right: keep the nearest
                side = "ahead" if right == 0 else "right" if right > 0 else "left"
                walls[side] = min(walls.get(side, (99, 0, 0)), (forward + abs(right), forward, right))
            continue
        seen.append((forward, right, _thing(kind, IDX_TO_COLOR[int(image[i, j, 1])], int(image[i, j, 2]))))
    seen += [(forward, right, "a wall") for _, forward, right in walls.values()]
    lines = [f"You see {thing} {_where(forward, right)}" for forward, right, thing in sorted(seen)] or ["You see nothing"]
    if image[ax, ay, 0] > 1:
        lines.append(f"You carry a {IDX_TO_COLOR[int(image[ax, ay, 1])]} {IDX_TO_OBJECT[int(image[ax, ay, 0])]}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# The environment
# --------------------------------------------------------------------------------------------------
class BabyAIText:
    """One BabyAI level, one episode at a time, gymnasium-style (reset/step), with text observations.

    Reward 1.0 exactly when minigrid's verifier reports success (minigrid's own is 1 - 0.9 * step / max_steps),
    else 0.0; an episode that minigrid ends in failure (a wrong pickup in PickupDistDebug) has success False.
    A step that ends both by success and by the time limit is terminated, not truncated.

    The social partner answers for every mission of the level's grammar what minigrid's verifier would: GoTo is
    achieved when the cell in front holds an object the mission describes, PickUp when the agent, empty-handed
    before the step, picks up one. Descriptions use the object's type, color and location at the reset, with
    "the" when one object of the layout matches, as the mission generator words them. `achieved_goals` lists a
    mission the first time only in the episode (as Playground-Text's partner; minigrid's own mission ends the
    episode then). So the verifier's stale positions (it keeps accepting the cell of an object picked up or
    toggled away until the next drop) never matter: the object was faced, so achieved, before it left.
    """

    def __init__(self, level: str = "BabyAI-GoToLocal-v0", split: str = "train", seed: int | None = None):
        self.grammar = _check_level(level)
        self.level, self.split = level, _check_split(split)
        if seed is not None:
            _check_index("seed", seed)
        # Episode k's layout comes from (seed, k): the state is two ints and the actions since the reset.
        self.seed = int(seed) if seed is not None else int(np.random.SeedSequence().entropy)
        self._draws = 0
        self._episode_seed: int | None = None
        self._actions: list[int] = []
        self._over = True
        with contextlib.redirect_stdout(io.StringIO()):
            self.minigrid = gym.make(level).unwrapped
        self._train_missions = set(all_missions(level, "train"))

    # -- episode ------------------------------------------------------------------------------------
    def reset(self, seed: int | None = None):
        """Start the next episode whose mission is in the split (`seed` restarts the env's sequence of episodes)."""
        if seed is not None:
            _check_index("seed", seed)
            self.seed, self._draws = int(seed), 0
        for _ in range(10_000):  # about 1 in 9 layouts has a test mission in the pick-up levels
            episode_seed = env_seed(self.seed, self._draws)
            self._draws += 1
            self._start(episode_seed)
            if is_held_out(self.minigrid.mission) == (self.split == "test"):
                break
        else:
            raise RuntimeError(f"{self.level} gave no {self.split} mission in 10,000 layouts")
        self._begin(episode_seed)
        return describe(self._image), {"goal": self.goal, "possible_actions": list(ACTIONS)}

    def _start(self, episode_seed: int):
        # minigrid prints "Sampling rejected: ..." while it generates a layout: keep it out of the scripts' output.
        with contextlib.redirect_stdout(io.StringIO()):
            obs, _ = self.minigrid.reset(seed=episode_seed)
        self._image = obs["image"]

    def _begin(self, episode_seed: int):
        """The social partner's view of the fresh layout: every object and what missions it answers to."""
        env, grammar = self.minigrid, self.grammar
        self.goal = env.mission
        self._episode_seed, self._actions, self._achieved, self._over = episode_seed, [], set(), False
        width = env.grid.width
        # (type, color, location) -> cells that match, None matching any: walls count, as in minigrid's ObjDesc,
        # so PickupDist says "a grey object" even of the one grey object.
        counts = Counter()
        objects, locations = [], []
        for idx, cell in enumerate(env.grid.grid):
            if cell is None:
                continue
            pos = (idx % width, idx // width)
            locs = self._locations(pos) if grammar.locations else ()
            for kind in (cell.type, None):
                for color in (cell.color, None):
                    for loc in (None, *locs):
                        counts[kind, color, loc] += 1
            if cell.type in OBJECT_TYPES:
                objects.append(cell)
                locations.append(locs)
        self._objects = objects  # held, so that no id below is reused by another object during the episode
        self._descriptions = {}  # id(object) -> the missions that describe it
        for obj, locs in zip(objects, locations):
            kinds = (obj.type, None) if grammar.any_type else (obj.type,)
            colors = (obj.color, None) if grammar.any_color else (obj.color,)
            self._descriptions[id(obj)] = [
                _surface(grammar.verb, kind, color, loc, counts[kind, color, loc])
                for kind in kinds
                for color in colors
                if kind or color
                for loc in (None, *locs)
            ]

    def _locations(self, pos: tuple[int, int]) -> tuple[str, ...]:
        """Where an object lies from the agent's start, as ObjDesc's locations (objects of the start room only)."""
        env = self.minigrid
        ax, ay = (int(x) for x in env.agent_pos)
        if not env.room_from_pos(ax, ay).pos_inside(*pos):
            return ()
        fx, fy = DIR_TO_VEC[env.agent_dir]
        dx, dy = pos[0] - ax, pos[1] - ay
        ahead, side = dx * fx + dy * fy, dy * fx - dx * fy  # side < 0: on the agent's left
        return tuple(
            loc for loc, ok in (("left", side < 0), ("right", side > 0), ("front", ahead > 0), ("behind", ahead < 0)) if ok
        )

    def check_action(self, action: str) -> None:
        """Raise, changing nothing, unless `action` can be taken now (the vector env checks all envs first)."""
        if self._over:
            raise RuntimeError("the episode is over: call reset() before step()")
        if action not in ACTION_INDEX:
            raise ValueError(f"invalid action {action!r}: possible actions are {list(ACTIONS)}")

    def step(self, action: str):
        self.check_action(action)
        success, terminated, truncated, achieved = self._advance(ACTION_INDEX[action])
        info = {"goal": self.goal, "possible_actions": list(ACTIONS), "success": success, "achieved_goals": achieved}
        return describe(self._image), float(success), terminated, truncated, info

    def _advance(self, action: int):
        env = self.minigrid
        carried = env.carrying
        obs, reward, terminated, truncated, _ = env.step(action)
        self._image = obs["image"]
        self._actions.append(action)
        if self.grammar.verb == "go to":
            target = env.grid.get(*env.front_pos)  # a wall or door has no descriptions
        else:
            target = env.carrying if action == PICKUP and carried is None else None
        achieved = [m for m in self._descriptions.get(id(target), ()) if m not in self._achieved]
        self._achieved.update(achieved)
        success = bool(terminated and reward > 0)  # minigrid rewards success only, with at least 0.1
        self._over = bool(terminated or truncated)
        return success, bool(terminated), bool(truncated and not terminated), achieved

    def relabels(self, goal: str) -> bool:
        """May hindsight relabeling use this goal? A training mission of this level's grammar."""
        return goal in self._train_missions

    # -- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Plain data: the episode's reset seed and actions, which load_state_dict replays (minigrid has no state
        to save), and the seed and count of layouts drawn, from which the next resets follow."""
        episode = None if self._episode_seed is None else {"seed": self._episode_seed, "actions": list(self._actions)}
        return {"level": self.level, "split": self.split, "seed": self.seed, "draws": self._draws, "episode": episode}

    def load_state_dict(self, state: dict):
        if (state["level"], state["split"]) != (self.level, self.split):
            raise ValueError(
                f"the state is of level {state['level']} ({state['split']} split), this env is {self.level} "
                f"({self.split} split): make the env with the options it was saved with"
            )
        self.seed, self._draws = state["seed"], state["draws"]
        episode = state["episode"]
        if episode is None:
            self._episode_seed, self._actions, self._over = None, [], True
            return
        self._start(episode["seed"])
        self._begin(episode["seed"])
        for action in episode["actions"]:
            self._advance(action)


class SyncVecBabyAIText:
    """N BabyAIText envs stepped in lockstep, with auto-reset.

    When env i's episode ends at a step, `observations[i]` and `infos[i]` are those of its next episode, and
    `infos[i]["final_observation"]` / `infos[i]["final_info"]` hold the last observation and step info of the
    episode that ended. Env i is seeded with env_seed(seed, first_index + i, stream), so envs do not depend on
    the process count. A step with an invalid action raises before any env moves.
    """

    max_actions = len(ACTIONS)

    def __init__(
        self, num_envs: int, seed: int | None = None, first_index: int = 0, split: str = "train", stream: int = 0, **options
    ):
        if isinstance(num_envs, bool) or not isinstance(num_envs, int) or num_envs < 1:
            raise ValueError(f"num_envs={num_envs!r}: give a positive integer")
        if seed is not None:
            _check_index("seed", seed)
        _check_index("first_index", first_index)
        _check_index("stream", stream)
        known = {f.name for f in fields(Options)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown options {unknown}: BabyAI-Text's options are {', '.join(sorted(known))}")
        opts = Options(**options)
        if seed is None:
            seed = int(np.random.SeedSequence().entropy)
        self.num_envs, self.level, self.split = num_envs, opts.level, split
        self.envs = [BabyAIText(opts.level, split, env_seed(seed, first_index + i, stream)) for i in range(num_envs)]

    def reset(self):
        results = [env.reset() for env in self.envs]
        return [r[0] for r in results], [r[1] for r in results]

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

    def relabels(self, goal: str) -> bool:
        """May hindsight relabeling use this goal? A training mission of the level's grammar."""
        return self.envs[0].relabels(goal)

    def state_dict(self) -> list[dict]:
        """Every env's state as plain data (BabyAIText.state_dict), for checkpoints."""
        return [env.state_dict() for env in self.envs]

    def load_state_dict(self, states: list[dict]):
        if len(states) != self.num_envs:
            raise ValueError(f"got the states of {len(states)} envs for {self.num_envs} envs")
        for env, state in zip(self.envs, states):
            env.load_state_dict(state)


def vector_env(
    num_envs: int, seed: int | None, first_index: int = 0, split: str = "train", stream: int = 0, **options
) -> SyncVecBabyAIText:
    """The scripts' entry point: num_envs envs of the level in `options` (see Options), split "train" or "test"."""
    return SyncVecBabyAIText(num_envs, seed, first_index, split, stream, **options)
