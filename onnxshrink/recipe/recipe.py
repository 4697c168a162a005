"""A recipe: a versioned, ordered list of steps plus how to read the data, in YAML or JSON.

::

    version: 1
    data:
      calibration: ../../sample_models/digits_calib.npz   # relative to this file
    steps:
      - type: prune.channels
        ratio: 0.25
      - type: quantize.int8
      - type: bench

Rules checked on load (each a one-line :class:`ConfigError`): ``version`` is one this
onnxshrink reads; every key is known (with a did-you-mean hint); values have the documented
types; at most one ``quantize.int8``, with ``fold`` and pruning before it; ``bench`` only as
the last step.

YAML is read with ``yaml.safe_load`` (PyYAML is a core dependency: hand-written recipes want
comments, and PyYAML is small, ubiquitous and has wheels everywhere); ``.json`` files are read
with the json module. Files are written as YAML unless the name ends in ``.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from onnxshrink.data import DataOptions, ImagePreprocess
from onnxshrink.errors import ConfigError, ShrinkError
from onnxshrink.recipe._codec import build, did_you_mean, to_plain_dict
from onnxshrink.recipe.steps import PATH, BenchStep, Int8Step, Step, step_from_dict, step_to_dict

#: The recipe format this onnxshrink writes and reads.
RECIPE_VERSION = 1
_TOP_KEYS = ("version", "description", "data", "steps")


@dataclass(frozen=True, kw_only=True)
class DataSpec:
    """Where the calibration data is and how to read it (the ``data`` section).

    Attributes:
        calibration: a .npz file, a folder of .npz or images, or ``random``; a relative path
            is relative to the recipe file. The command line's ``--calib`` overrides it.
        seed: seed for ``random`` data.
        shapes: fixed input shapes, e.g. ``{input: [1, 3, 224, 224]}``.
        image_size, layout, mean, std, scale, color: image folders' preprocessing (as the
            ``shrink`` flags of the same names).
    """

    calibration: str | None = field(default=None, metadata=PATH)
    seed: int = 0
    shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    image_size: tuple[int, ...] | None = None
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    scale: float = 1.0 / 255.0
    color: Literal["RGB", "BGR", "L"] = "RGB"

    def __post_init__(self) -> None:
        if self.image_size is not None and len(self.image_size) != 2:
            raise ConfigError(f"image_size must be [height, width], not {list(self.image_size)}")

    def data_options(self) -> DataOptions:
        size = (self.image_size[0], self.image_size[1]) if self.image_size else None
        preprocess = ImagePreprocess(size=size, layout=self.layout, mean=self.mean, std=self.std, scale=self.scale, mode=self.color)
        return DataOptions(preprocess=preprocess, seed=self.seed, shapes={k: list(v) for k, v in self.shapes.items()})


def _resolve(value: str | None, base: Path | None) -> str | None:
    if value is None or value == "random" or base is None or os.path.isabs(value):
        return value
    return os.path.normpath(os.path.join(base, value))


def _relative(value: str | None, base: Path | None) -> str | None:
    if value is None or value == "random" or base is None:
        return value
    try:
        return os.path.relpath(os.path.abspath(value), os.path.abspath(base))
    except ValueError:  # another drive (Windows)
        return value


def _map_paths(obj: Any, fn: Any) -> Any:
    changes = {f.name: fn(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.metadata.get("path")}
    return dataclasses.replace(obj, **changes) if changes else obj


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """An ordered list of steps and the data section; see the module docstring."""

    steps: tuple[Step, ...]
    data: DataSpec = field(default_factory=DataSpec)
    description: str | None = None
    version: int = RECIPE_VERSION

    def __post_init__(self) -> None:
        if not self.steps:
            raise ConfigError("recipe has no steps")
        kinds = [s.type for s in self.steps]
        if kinds.count("quantize.int8") > 1:
            raise ConfigError("quantize.int8 may appear only once")
        if "quantize.int8" in kinds:
            q = kinds.index("quantize.int8")
            late = [k for k in kinds[q:] if k in ("fold", "prune.channels", "prune.magnitude")]
            if late:
                raise ConfigError(f"'{late[0]}' must come before quantize.int8 (it needs the float model)")
        if "bench" in kinds and (kinds.count("bench") > 1 or kinds[-1] != "bench"):
            raise ConfigError("'bench' may appear once, as the last step")
        if kinds == ["bench"]:
            raise ConfigError("nothing to do besides 'bench'; add a step that changes the model")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, data: Any, *, base_dir: str | os.PathLike[str] | None = None, source: str = "recipe") -> Recipe:
        """Build and check a recipe from parsed YAML/JSON; relative paths join ``base_dir``."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: a recipe is a mapping with 'version' and 'steps', not {type(data).__name__}")
        for key in data:
            if key not in _TOP_KEYS:
                raise ConfigError(f"{source}: unknown key '{key}'{did_you_mean(str(key), _TOP_KEYS)}; known: {', '.join(_TOP_KEYS)}")
        version = data.get("version")
        if version is None:
            raise ConfigError(f"{source}: missing 'version' (this onnxshrink writes version: {RECIPE_VERSION})")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ConfigError(f"{source}: version must be a positive integer, not {version!r}")
        if version > RECIPE_VERSION:
            raise ConfigError(f"{source}: recipe version {version} is newer than this onnxshrink reads ({RECIPE_VERSION}); upgrade onnxshrink")
        steps = data.get("steps")
        if not isinstance(steps, list) or not steps:
            raise ConfigError(f"{source}: 'steps' must be a non-empty list of steps")
        description = data.get("description")
        if description is not None and not isinstance(description, str):
            raise ConfigError(f"{source}: description must be a string")
        base = Path(base_dir) if base_dir is not None else None
        parsed = tuple(_map_paths(step_from_dict(s, f"{source}: step {i + 1}"), lambda p: _resolve(p, base)) for i, s in enumerate(steps))
        spec = build(DataSpec, data.get("data") or {}, f"{source}: data")
        try:
            return cls(steps=parsed, data=_map_paths(spec, lambda p: _resolve(p, base)), description=description, version=version)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc.message}") from None

    def to_dict(self, *, base_dir: str | os.PathLike[str] | None = None, paths: bool = True) -> dict[str, Any]:
        """The recipe as plain data; paths relative to ``base_dir`` (or left out)."""
        base = Path(base_dir) if base_dir is not None else None
        out: dict[str, Any] = {"version": self.version}
        if self.description:
            out["description"] = self.description
        data = to_plain_dict(_map_paths(self.data, lambda p: _relative(p, base)))
        if not paths:
            data.pop("calibration")
        out["data"] = data
        out["steps"] = [step_to_dict(_map_paths(s, lambda p: _relative(p, base)), paths=paths) for s in self.steps]
        return out

    def stamp(self) -> str:
        """Compact JSON of the recipe without paths (what output models record)."""
        return json.dumps(self.to_dict(paths=False), separators=(",", ":"), ensure_ascii=True)

    def with_calibration(self, calibration: str | None) -> Recipe:
        return dataclasses.replace(self, data=dataclasses.replace(self.data, calibration=calibration))

    # ------------------------------------------------------------------ queries
    @property
    def int8(self) -> Int8Step | None:
        return next((s for s in self.steps if isinstance(s, Int8Step)), None)

    @property
    def bench(self) -> BenchStep | None:
        return next((s for s in self.steps if isinstance(s, BenchStep)), None)

    def summary(self) -> str:
        """One line: ``prune.channels(ratio=0.25) -> quantize.int8 -> bench``."""
        parts = []
        for step in self.steps:
            key = {"prune.channels": ("ratio", "target_mac_reduction"), "prune.magnitude": ("sparsity", "threshold"),
                   "quantize.int8": ("method",), "distill": ("epochs",)}.get(step.type, ())  # fmt: skip
            d = step_to_dict(step)
            shown = [f"{k}={d[k]}" for k in key if d.get(k) is not None]
            parts.append(step.type + (f"({', '.join(shown)})" if shown else ""))
        return " -> ".join(parts)


# ---------------------------------------------------------------------- files


def parse_text(text: str, *, name: str) -> Any:
    """Parse recipe text as JSON (``.json``) or YAML."""
    if name.endswith(".json"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"not valid JSON: {exc.msg} at line {exc.lineno}", path=name) from None
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"not valid YAML: {problem}{where}", path=name) from None


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    """Read and check a recipe file (relative paths inside it are relative to its folder)."""
    p = Path(path)
    try:
        if not p.is_file():
            raise ShrinkError("recipe file not found" if not p.exists() else "recipe must be a regular file", path=p)
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ShrinkError(f"cannot read recipe ({exc})", path=p) from None
    return Recipe.from_dict(parse_text(text, name=p.name), base_dir=p.resolve().parent, source=str(p))


def dumps(recipe: Recipe, *, fmt: str = "yaml", base_dir: str | os.PathLike[str] | None = None) -> str:
    """The recipe as YAML or JSON text (paths relative to ``base_dir``)."""
    data = recipe.to_dict(base_dir=base_dir)
    if fmt == "json":
        return json.dumps(data, indent=2) + "\n"
    import yaml

    return f"# onnxshrink recipe (onnxshrink recipe show FILE explains it)\n{yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)}"


def save_recipe(recipe: Recipe, path: str | os.PathLike[str]) -> Path:
    """Write ``recipe`` atomically (YAML, or JSON for a ``.json`` name)."""
    p = Path(path)
    if not p.parent.is_dir():
        raise ShrinkError("folder for the recipe does not exist", path=p)
    text = dumps(recipe, fmt="json" if p.name.endswith(".json") else "yaml", base_dir=p.resolve().parent)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, p)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ShrinkError(f"cannot write recipe ({exc.strerror or exc})", path=p) from None
    return p
