"""Prompts and stories: the community's `"a red house:1 | fog:-0.5"` syntax, parsed into typed values.

A prompt is `TEXT[:WEIGHT[:STOP]]`; prompts are separated by `|`. WEIGHT (default 1) scales the prompt's loss;
a negative weight pushes the image away from it. STOP (default none) is the distance below which the prompt
stops pulling (as in the well-known notebook: its gradient is cut where the signed distance is below STOP; a
negative prompt's distance is negated, so its STOP is negative too: -1.23 stops pushing past 90 degrees).
The distance is the spherical one of losses.py, theta^2 / 2 for the angle theta between the embeddings: 0 for
the same direction, 1.23 at 90 degrees, 4.93 opposite; CLIP's typical image-text cosine of 0.3 is 0.80.
Only trailing fields that read as numbers are taken as weight and stop, so `a sign: "open"` stays one text.

An image prompt is the same with a file path in place of the text (`--image-prompt "cat.png:0.5"`): its
target is CLIP's embedding of that image.

A story is a sequence of scenes over the run, separated by `||`; each scene is a set of prompts as above and
may end with `@FRACTION`, the point of the run (0..1) where it starts:
`"a red house | fog:-0.5 || a blue sea @0.6"`. Scenes without a fraction share the rest of the run evenly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

MAX_DISTANCE = math.pi ** 2 / 2  # the spherical distance of opposite embeddings (losses.spherical_distance)


@dataclass(frozen=True)
class Prompt:
    """One target: a text, or an image file (`image`), with its weight and stop."""

    text: str = ""
    image: Path | None = None
    weight: float = 1.0
    stop: float = -math.inf

    @property
    def label(self) -> str:
        """A short name for logs and the report (made distinct within a run by `prompt_labels`)."""
        return shorten(self.image.name if self.image is not None else self.text, 40)


def shorten(name: str, width: int) -> str:
    """At most `width` characters: the start and the end kept (labels differ at either: `fog (1)`, `fog (-0.5)`)."""
    if len(name) <= width:
        return name
    head = (width - 3) * 2 // 3
    return name[:head].rstrip() + "..." + name[len(name) - (width - 3 - head):].lstrip()


def unique_names(names: list[str], width: int) -> list[str]:
    """`names` cut to `width` characters, distinct: a cut name that two share ends in #1, #2 ... instead."""
    cut = [shorten(n, width) for n in names]
    out, seen = [], {}
    for name, n in zip(names, cut):
        if cut.count(n) > 1:
            seen[n] = seen.get(n, 0) + 1
            tag = f" #{seen[n]}"
            n = shorten(name, width - len(tag)) + tag
        out.append(n)
    return out


def _number(s: str) -> float | None:
    try:
        value = float(s)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def parse_prompt(item: str, image: bool = False, option: str = "--prompt") -> Prompt:
    """`TEXT[:WEIGHT[:STOP]]` (or `PATH[:WEIGHT[:STOP]]` with image=True) -> Prompt."""
    parts = item.strip().split(":")
    numbers: list[float] = []
    while len(parts) > 1 and len(numbers) < 2 and _number(parts[-1].strip()) is not None:
        numbers.insert(0, _number(parts.pop().strip()))
    body = ":".join(parts).strip()
    if not body:
        raise UserError(f"{option} {item!r}: empty prompt; write TEXT[:WEIGHT[:STOP]], e.g. 'a red house:1'")
    weight = numbers[0] if numbers else 1.0
    stop = numbers[1] if len(numbers) > 1 else -math.inf
    if weight == 0:
        raise UserError(f"{option} {item!r}: weight 0 does nothing; use a positive weight to pull toward it or a "
                        "negative one to push away")
    _check_stop(item, weight, stop, option)
    if not image:
        return Prompt(text=body, weight=weight, stop=stop)
    path = Path(body).expanduser()
    if not path.is_file():
        raise UserError(f"--image-prompt {item!r}: image file {path} does not exist")
    return Prompt(image=path, weight=weight, stop=stop)


def _check_stop(item: str, weight: float, stop: float, option: str) -> None:
    """STOP compares with the signed distance (negative for a negative weight): outside its range it would make
    the prompt never act, or be no stop at all."""
    if stop == -math.inf:
        return
    if weight > 0 and not 0 <= stop < MAX_DISTANCE:
        raise UserError(f"{option} {item!r}: STOP {stop:g} must lie in 0..{MAX_DISTANCE:.2f}: the spherical distance "
                        "below which the prompt stops pulling (0.8 is a cosine of 0.3)")
    if weight < 0 and not -MAX_DISTANCE < stop <= 0:
        raise UserError(f"{option} {item!r}: STOP {stop:g} of a negative prompt must lie in -{MAX_DISTANCE:.2f}..0: "
                        "minus the distance beyond which it stops pushing (-1.23 stops at 90 degrees)")


def parse_prompts(spec: str, image: bool = False, option: str = "--prompt") -> list[Prompt]:
    """`"a:1 | b:-0.5"` -> [Prompt, Prompt]; empty items are skipped."""
    return [parse_prompt(p, image, option) for p in spec.split("|") if p.strip()]


@dataclass(frozen=True)
class Scene:
    """The prompts in force from `start` (a fraction of the run, 0..1) until the next scene's start."""

    start: float
    prompts: tuple[Prompt, ...]


@dataclass(frozen=True)
class Story:
    """Scenes over the run, sorted by start; the first starts at 0. One scene: prompts that never change."""

    scenes: tuple[Scene, ...]

    def at(self, fraction: float) -> Scene:
        """The scene in force at `fraction` (0..1) of the run."""
        current = self.scenes[0]
        for scene in self.scenes:
            if scene.start <= fraction:
                current = scene
        return current

    @property
    def prompts(self) -> list[Prompt]:
        """Every distinct prompt of the story, in order of first appearance (each is embedded once)."""
        seen: dict[Prompt, None] = {}
        for scene in self.scenes:
            seen.update(dict.fromkeys(scene.prompts))
        return list(seen)


def prompt_labels(prompts: list[Prompt]) -> dict[Prompt, str]:
    """A distinct label for each prompt: two image files of the same name are told apart by their folders, the
    same text at two weights by its weight, and anything else still equal by #1, #2."""
    first = [p.label for p in prompts]
    labels = list(first)
    for i, p in enumerate(prompts):
        if first.count(p.label) > 1:
            if p.image is not None:
                labels[i] = shorten(str(Path(p.image.parent.name) / p.image.name), 40)
            else:
                labels[i] = f"{p.label} ({p.weight:g})"
    return dict(zip(prompts, unique_names(labels, 48)))


def parse_story(spec: str, extra: list[Prompt] = ()) -> Story:
    """`"a | b:-0.5 || c @0.6"` -> Story; `extra` prompts (image prompts) join every scene."""
    scenes: list[tuple[float | None, tuple[Prompt, ...]]] = []
    for i, part in enumerate(p for p in spec.split("||")):
        text, start = part, None
        if "@" in part:
            head, _, tail = part.rpartition("@")
            value = _number(tail.strip())
            if value is not None:
                if not 0 <= value <= 1:
                    raise UserError(f"--story scene {i + 1}: start @{tail.strip()} must lie in 0..1 (a fraction of "
                                    "the run)")
                text, start = head, value
        prompts = tuple(parse_prompts(text, option="--story")) + tuple(extra)
        if not prompts:
            raise UserError(f"--story scene {i + 1} has no prompt; scenes are separated by '||', e.g. 'a house || "
                            "the sea @0.5'")
        scenes.append((start, prompts))
    return Story(tuple(_place(scenes)))


def _place(scenes: list[tuple[float | None, tuple[Prompt, ...]]]) -> list[Scene]:
    """Fill in the missing starts: the first scene at 0, the others spread evenly between the given ones."""
    starts = [s for s, _ in scenes]
    if starts[0] is None:
        starts[0] = 0.0
    elif starts[0] != 0:
        raise UserError(f"--story: the first scene starts at 0, not @{starts[0]}; drop its '@'")
    known = [i for i, s in enumerate(starts) if s is not None] + [len(starts)]
    for a, b in zip(known, known[1:]):
        end = 1.0 if b == len(starts) else starts[b]
        for k in range(a + 1, b):
            starts[k] = starts[a] + (end - starts[a]) * (k - a) / (b - a)
    if any(x > y for x, y in zip(starts, starts[1:])):
        raise UserError(f"--story: scene starts must increase, got {', '.join(f'{s:g}' for s in starts)}")
    return [Scene(s, p) for s, (_, p) in zip(starts, scenes)]


def story_from_options(prompt: str | None, story: str | None, image_prompts: list[str]) -> Story:
    """The CLI's `--prompt`, `--story` and `--image-prompt` options -> one Story (at least one prompt)."""
    images = [p for spec in image_prompts for p in parse_prompts(spec, image=True, option="--image-prompt")]
    if prompt and story:
        raise UserError("give either --prompt or --story, not both (a story's first scene is its prompt)")
    if story:
        return parse_story(story, images)
    prompts = tuple(parse_prompts(prompt, option="--prompt")) if prompt else ()
    if not prompts + tuple(images):
        raise UserError("nothing to aim at: give --prompt 'TEXT[:WEIGHT]', --story or --image-prompt PATH")
    return Story((Scene(0.0, prompts + tuple(images)),))
