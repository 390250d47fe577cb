"""`ztagent lab`'s command line and the command lines it starts, without running anything:
which lab an action applies to, and flags every lab process's own parser accepts."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

from ztagent.cli import build_parser
from ztagent.lab import command, processes, state
from ztagent.lab.topology import DEFAULT_PREFIX, LabError, Plan, Settings, make_plan
from ztagent.waypoint.command import settings_from_args


def lab_args(*words: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ztagent")
    command.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["lab", *words])


@pytest.fixture
def plan(tmp_path: Path) -> Plan:
    return make_plan(Settings(directory=tmp_path / "lab"))


def test_the_flags_choose_the_lab(tmp_path: Path) -> None:
    args = lab_args("up", "--dir", str(tmp_path), "--prefix", "zt9-")
    assert args.explicit_settings and args.handler is command._run
    plan = command._plan(args)
    assert (plan.prefix, plan.directory) == ("zt9-", tmp_path)


def test_a_recorded_lab_keeps_its_settings(tmp_path: Path) -> None:
    state.save(tmp_path / "state.json", state.State("zt9-", "10.250.0.0/16", "10.251.0.0/24"))
    for action in ("up", "demo", "status", "down"):
        plan = command._plan(lab_args(action, "--dir", str(tmp_path)))
        assert plan.prefix == "zt9-" and plan.settings.pod_cidr == "10.250.0.0/16"
    # Other settings given explicitly for a recorded lab: only `down` goes ahead (with its own).
    for action in ("up", "demo", "status"):
        with pytest.raises(LabError, match="run `ztagent lab down --dir"):
            command._plan(lab_args(action, "--dir", str(tmp_path), "--prefix", DEFAULT_PREFIX))
    plan = command._plan(lab_args("down", "--dir", str(tmp_path), "--prefix", DEFAULT_PREFIX))
    assert plan.prefix == "zt9-"


def _after_module(line: list[str]) -> list[str]:
    assert line[:3] == [sys.executable, "-m", "ztagent"]
    return line[3:]


def test_the_processes_command_lines_parse(plan: Plan) -> None:
    parser = build_parser()
    control = parser.parse_args(_after_module(processes.control_command(plan)))
    assert control.command == "control"
    for capture in (False, True):
        node = plan.nodes[0]
        args = parser.parse_args(_after_module(processes.agent_command(plan, node, capture)))
        assert args.command == "node" and args.node_name == node.name
    args = parser.parse_args(_after_module(processes.waypoint_command(plan)))
    settings = settings_from_args(args)
    pod = plan.waypoint
    assert (settings.pod_name, settings.listen, settings.readiness_addr) == (
        pod.key,
        pod.hbone,
        pod.readiness,
    )
    assert settings.token_path == str(plan.token_path(pod.key).resolve())


def test_the_app_command_line() -> None:
    pod = make_plan(Settings()).pod("b-web2")
    line = processes.app_command(pod)
    assert line[:3] == [sys.executable, "-m", "ztagent.lab.apps"]
    assert line[line.index("--name") + 1] == "b-web2"


def test_process_env_leaves_out_what_the_flags_say(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDS_ADDRESS", "https://elsewhere:15012")
    monkeypatch.setenv("LAB_UNRELATED", "kept")
    env = processes.process_env()
    assert "XDS_ADDRESS" not in env and env["LAB_UNRELATED"] == "kept"
    assert not set(processes.AGENT_ENV_DROPPED) & set(env)
