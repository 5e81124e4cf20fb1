"""driver/cli.py: the parser's choices and defaults come from their one source (the engine registry, the
system.toml dataclasses), --print-config prints the effective system spec and runs nothing, and the socket
names `mlmm run` accepts are the registered client kinds."""
from __future__ import annotations

import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from coupling.engines import ENGINES
from driver import cli, xmlinput
from potentials.core.errors import SetupError
from potentials.core.spec import CouplingSpec, MMSpec, StructureSpec, SystemSpec

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "inputs" / "examples" / "methanol" / "prepared" / "system.toml"


def test_defaults_and_choices_come_from_their_source():
    p = cli.build_parser()
    prep = p.parse_args(["prepare", "x.pdb", "--out", "o"])
    assert prep.embedding_cutoff == CouplingSpec().cutoff_nm and prep.mm_cutoff == MMSpec().cutoff_nm
    assert prep.forcefield == StructureSpec(file="x").forcefield
    for kind in ENGINES.names():
        assert p.parse_args(["client", kind, "--system", "s.toml", "--address", "unix:a"]).kind == kind
    with pytest.raises(SystemExit):
        p.parse_args(["client", "qm", "--system", "s.toml", "--address", "unix:a"])
    for command in ("label", "train", "evaluate"):
        assert cli.TARGETS[command].startswith("driver.pipeline:")
    assert p.parse_args(["train", "c.toml", "--print-config"]).print_config
    assert p.parse_args(["label", "--out", "d.nc", "--print-config"]).print_config


@pytest.mark.parametrize("argv", [["run", "--system", str(EXAMPLE), "--print-config"],
                                  ["client", "ml", "--system", str(EXAMPLE), "--print-config"]])
def test_print_config_prints_the_spec_and_runs_nothing(argv, capsys):
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("# effective system spec of ")
    assert SystemSpec.from_dict(tomllib.loads(out)) == SystemSpec.load(EXAMPLE)


def test_client_needs_an_address(capsys):
    assert cli.main(["client", "mm", "--system", str(EXAMPLE)]) == 2
    assert "--address" in capsys.readouterr().err


def test_socket_names_are_the_registered_kinds():
    root = ET.fromstring("<simulation><ffsocket name='extra'/></simulation>")
    with pytest.raises(SetupError, match="'extra'.*has no client.*'mm', 'ml'"):
        xmlinput.sockets(root, "in.xml")
    ENGINES.register("extra", lambda spec, options=None: None)
    try:
        assert [s.name for s in xmlinput.sockets(root, "in.xml")] == ["extra"]
    finally:
        ENGINES.unregister("extra")
