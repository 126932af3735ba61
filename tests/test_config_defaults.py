"""Defaults live in the dataclasses (runtime/config.py, TinySpec in runtime/tiny_model.py, a
benchmark's `bench` block in experiments/schema.py); a YAML in conf/ holds only what differs from
them, so a default is changed in one place and every file that sets a key says something.

A key restates its default when its value is what the key would be without it: the dataclass
default, or what a config the file builds on (its `defaults:` list: a parent in its own group, a
group it overrides) already sets. Interpolations (`${...}`) always say something. Keys of untyped
nodes (`env`, `mode.bridge`: constructor arguments) have no dataclass default and are not checked.
A key that every option of a group sets is what choosing an option means (`loss=gspo` is
`loss_type: grpo` at sequence level; `advantage=group` is `estimator: group, scale_rewards:
group`): an option keeps it even where it equals the default, so that no option changes meaning
when a default does. A preset (`# @package _global_`) composes on top of other groups, so a key
that an option of another group sets says something there too (bench=sync_latency's
`mode.sync_every: 1` is not mode=legacy's 5).
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import typing
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from conftest import REPO
from runtime.config import Config, register_configs

CONF = REPO / "conf"
FILES = sorted(p for p in CONF.rglob("*.yaml") if "hydra" not in p.relative_to(CONF).parts)
NOTHING = object()


def package(path: Path) -> list[str]:
    """Where the file's keys land: its `# @package` line, else its group's path (Hydra's default)."""
    for line in path.read_text().splitlines():
        if found := re.match(r"#\s*@package\s+(\S+)", line):
            return [] if found.group(1) == "_global_" else found.group(1).split(".")
        if not line.startswith("#"):
            break
    return list(path.parent.relative_to(CONF).parts)


def raw(path: Path) -> dict:
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)


def rooted(path: Path) -> dict:
    """The file's own keys (no defaults list, no hydra block) at their place in the whole config."""
    node = {k: v for k, v in raw(path).items() if k not in ("defaults", "hydra")}
    for key in reversed(package(path)):
        node = {key: node}
    return node


def parents(path: Path) -> list[Path]:
    """The configs the file's defaults list composes before it: an option of its own group
    (`- cpu`), or of another (`override /mode: lora`, `/sync: reload`)."""
    found = []
    for entry in raw(path).get("defaults", []):
        if isinstance(entry, str) and entry != "_self_":
            found.append(path.parent / f"{entry}.yaml")
        elif isinstance(entry, dict):
            for group, option in entry.items():
                group = group.removeprefix("override ").removeprefix("optional ")
                if group.startswith("/") and isinstance(option, str):
                    found.append(CONF / group.lstrip("/") / f"{option}.yaml")
    return [p for p in found if p.is_file()]


def base(path: Path) -> dict:
    """What the file's parents set, merged (each with its own parents)."""
    merged = OmegaConf.create()
    for parent in parents(path):
        merged = OmegaConf.merge(merged, base(parent), rooted(parent))
    return OmegaConf.to_container(merged, resolve=False)


def schema(path: Path) -> type:
    """The root dataclass the file composes into: Config, plus the `bench` block of the benchmark
    that runs a conf/bench/ preset (the entry its header's command names)."""
    if path.parent != CONF / "bench":
        return Config
    entry = re.search(r"python -m experiments\.(\w+)", path.read_text()).group(1)
    try:
        bench = importlib.import_module(f"experiments.{entry}").BENCH
    finally:
        register_configs()  # importing an entry registers its schema as the root
    return dataclasses.make_dataclass("BenchConfig", [("bench", bench, dataclasses.field(default_factory=bench))],
                                      bases=(Config,))


def dataclass_of(hint) -> type | None:
    """The dataclass a field holds (Optional[X] too), else None."""
    for t in (hint, *typing.get_args(hint)):
        if dataclasses.is_dataclass(t):
            return t
    return None


def default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return NOTHING


def same(value: Any, expected: Any) -> bool:
    if isinstance(expected, str) and ("${" in expected or expected == "???"):
        return False  # an interpolation or MISSING: no value to restate
    if isinstance(value, bool) != isinstance(expected, bool):
        return False
    if isinstance(expected, float) and isinstance(value, (int, float, str)):
        try:
            return float(value) == expected
        except ValueError:
            return False
    return value == expected


def leaves(node: dict, path: str = "") -> set[str]:
    return set().union(*(leaves(v, f"{path}{k}.") if isinstance(v, dict) and v else {f"{path}{k}"}
                         for k, v in node.items()))


def selectors(group: Path) -> set[str]:
    """The keys every option of a group (two or more) sets itself."""
    options = sorted(group.glob("*.yaml"))
    if len(options) < 2 or group == CONF:
        return set()
    return set.intersection(*(leaves(rooted(p)) for p in options))


def set_elsewhere(path: Path) -> set[str]:
    """For a preset, the keys other groups' options set (what it may override); else none."""
    if package(path):
        return set()
    return set().union(*(leaves(rooted(p)) for p in FILES if p.parent != path.parent and p.parent != CONF))


def restated(cls: type, node: dict, parent: Any, path: str = "", keep: frozenset = frozenset()) -> list[str]:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    found = []
    for key, value in node.items():
        if key not in fields:
            continue  # not typed here (an untyped node's keys)
        above = parent.get(key, NOTHING) if isinstance(parent, dict) else NOTHING
        inner = dataclass_of(hints[key])
        if inner is not None and isinstance(value, dict):
            found += restated(inner, value, above if isinstance(above, dict) else {}, f"{path}{key}.", keep)
            continue
        if (isinstance(value, str) and "${" in value) or f"{path}{key}" in keep:
            continue
        expected = above if above is not NOTHING else default(fields[key])
        if expected is not NOTHING and same(value, expected):
            found.append(f"{path}{key}: {value!r}")
    return found


def test_every_config_file_is_seen():
    assert {"config.yaml", "benchmark.yaml"} <= {p.name for p in FILES}
    assert {p.parent.name for p in FILES} >= {"model", "env", "hardware", "advantage", "loss", "bench", "experiment",
                                             "finetune", "sync", "mode"}


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(CONF)))
def test_no_key_restates_its_default(path):
    keep = frozenset(selectors(path.parent) | set_elsewhere(path))
    assert restated(schema(path), rooted(path), base(path), keep=keep) == [], \
        f"{path.relative_to(REPO)} restates defaults: delete these keys (the default is in the dataclass)"


def test_the_check_catches_a_restated_default_and_spares_a_parents_override(tmp_path):
    assert restated(Config, {"train": {"steps": 40, "seed": 1}, "hardware": {"vllm_tp": 1}}, {}) == \
        ["train.steps: 40", "hardware.vllm_tp: 1"]
    # gpu_node sets vllm_tp 2; a file on top setting it back to 1 says something
    assert restated(Config, {"hardware": {"vllm_tp": 1}}, {"hardware": {"vllm_tp": 2}}) == []
    assert restated(Config, {"model": {"tiny": {"hidden_size": 128, "seed": 3}}}, {}) == ["model.tiny.hidden_size: 128"]
    assert restated(Config, {"optimizer": {"lr": "2e-4"}, "rollout": {"max_tokens": "${env.max_tokens}"}}, {}) == \
        ["optimizer.lr: '2e-4'"]
    assert restated(Config, {"loss": {"loss_type": "grpo"}}, {}, keep=frozenset({"loss.loss_type"})) == []
    assert selectors(CONF / "loss") == {"loss.loss_type"}
