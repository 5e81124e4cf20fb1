"""driver/xmlinput.py and the i-PI templates: validation messages, patching, and that i-PI's own input
parser accepts every patched template."""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from driver import xmlinput
from potentials.core.errors import SetupError

TEMPLATES = Path(__file__).resolve().parents[2] / "inputs" / "templates"
ALL = sorted(p for p in TEMPLATES.glob("*.xml") if not p.name.startswith("pimd_"))   # PIMD ones: test_pimd.py


def _xml(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "in.xml"
    p.write_text(text)
    return p


MINIMAL = """<simulation>
  <ffsocket name='{name}' mode='{mode}'><address>x</address></ffsocket>
  <system><forces><force forcefield='{force}'/></forces></system>
</simulation>"""


def test_templates_present():
    assert {p.name for p in ALL} >= {"nvt_bussi.xml", "nve.xml", "nvt_bussi_mm.xml", "nve_mm.xml"}


def test_malformed_xml_names_line_and_column(tmp_path):
    p = _xml(tmp_path, "<simulation>\n  <ffsocket name='mm'>\n</simulation>\n")
    with pytest.raises(SetupError) as exc:
        xmlinput.load(p)
    msg = str(exc.value)
    assert f"{p}:3:" in msg and "malformed XML" in msg and "mismatched tag" in msg and "\n" not in msg


def test_missing_file_and_wrong_root(tmp_path):
    with pytest.raises(SetupError, match="not found"):
        xmlinput.load(tmp_path / "nope.xml")
    with pytest.raises(SetupError, match="<simulation>"):
        xmlinput.load(_xml(tmp_path, "<system/>"))


def test_unknown_socket_name_lists_known(tmp_path):
    root = xmlinput.load(_xml(tmp_path, MINIMAL.format(name="qm", mode="unix", force="qm"))).getroot()
    with pytest.raises(SetupError) as exc:
        xmlinput.sockets(root, "in.xml")
    assert "'qm'" in str(exc.value) and "'mm'" in str(exc.value) and "'ml'" in str(exc.value)


def test_socket_modes(tmp_path):
    root = ET.fromstring("<simulation><ffsocket name='mm'><address>a</address></ffsocket>"
                         "<ffsocket name='ml' mode='inet'><address>node7</address><port>31415</port></ffsocket>"
                         "</simulation>")
    mm, ml = xmlinput.sockets(root)
    assert (mm.mode, mm.address) == ("unix", "a")           # no mode: unix, never a silent open port
    assert (ml.mode, ml.address, ml.port) == ("inet", "node7", 31415)
    shm = ET.fromstring("<simulation><ffsocket name='mm' mode='shm'/></simulation>")
    with pytest.raises(SetupError, match="mode='shm'"):
        xmlinput.sockets(shm)
    dup = ET.fromstring("<simulation><ffsocket name='mm'/><ffsocket name='mm'/></simulation>")
    with pytest.raises(SetupError, match="two <ffsocket>s"):
        xmlinput.sockets(dup)


def test_force_must_name_a_forcefield(tmp_path):
    root = xmlinput.load(_xml(tmp_path, MINIMAL.format(name="mm", mode="unix", force="ml"))).getroot()
    with pytest.raises(SetupError, match="<force forcefield='ml'> refers to no forcefield"):
        xmlinput.force_components(root)


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name)
def test_template_contents(path):
    root = xmlinput.load(path).getroot()
    names = [s.name for s in xmlinput.sockets(root, path.name)]
    assert xmlinput.force_components(root, path.name) == names          # one force per socket, same order
    assert set(names) == ({"mm"} if path.stem.endswith("_mm") else {"mm", "ml"})
    for el in root.iter("ffsocket"):
        assert el.get("mode") == "unix" and el.get("pbc") == "false"
        assert float(el.findtext("latency")) == pytest.approx(1e-4)
    assert root.get("threading") == "false"
    props = root.find("output/properties")
    assert int(root.get("safe_stride")) == int(props.get("stride"))
    text = props.text
    for col in ("step", "time{picosecond}", "conserved{kiloj/mol}", "temperature{kelvin}", "kinetic_md{kiloj/mol}",
                "potential{kiloj/mol}"):
        assert col in text
    for i in range(len(names)):
        assert f"pot_component_raw({i}){{kiloj/mol}}" in text
    assert root.find("system/initialize/file") is None                 # filled in by mlmm run
    assert xmlinput.timestep_ps(root) == pytest.approx(5e-4)
    [traj] = xmlinput.position_trajectories(root)
    assert traj.what == "positions" and traj.format == "xyz"
    assert root.find("output/checkpoint") is not None
    motion = root.find("system/motion")
    if path.stem.startswith("nve"):
        assert motion.find("dynamics").get("mode") == "nve" and motion.findtext("fixcom").strip() == "False"
    elif path.stem.startswith("npt"):                                    # runs: tests/driver/test_npt.py
        dyn = motion.find("dynamics")
        assert dyn.get("mode") == "npt" and dyn.find("barostat").get("mode") == "isotropic"
        assert dyn.find("thermostat").get("mode") == "svr"
        assert float(root.findtext("system/ensemble/temperature")) == 300.0
        assert float(root.findtext("system/ensemble/pressure")) == 1.0
    else:
        assert motion.find("dynamics").get("mode") == "nvt"
        assert motion.find("dynamics/thermostat").get("mode") == "svr"
        assert float(root.findtext("system/ensemble/temperature")) == 300.0


def test_patch(tmp_path):
    tree = xmlinput.load(TEMPLATES / "nvt_bussi.xml")
    root = tree.getroot()
    init = root.find("system/initialize")
    ET.SubElement(init, "file", mode="xyz").text = "old.xyz"                 # a template's own file is replaced
    xmlinput.patch(root, init_file="init.extxyz", sockets_prefix="/tmp/mlmm-x/", steps=123, seed=7)
    xmlinput.patch(root, init_file="init.extxyz", sockets_prefix="/tmp/mlmm-x/", steps=123, seed=7)  # idempotent
    out = tmp_path / "input.xml"
    xmlinput.write(tree, out)
    root = ET.parse(out).getroot()
    assert root.get("sockets_prefix") == "/tmp/mlmm-x/"
    assert {el.get("name"): el.findtext("address").strip() for el in root.iter("ffsocket")} == {"mm": "mm", "ml": "ml"}
    files = root.findall("system/initialize/file")
    assert len(files) == 1 and files[0].get("mode") == "ase" and files[0].text.strip() == "init.extxyz"
    assert root.find("system/initialize")[0] is files[0]          # before <velocities>: masses come from the file
    assert xmlinput.total_steps(root) == 123
    assert root.findtext("prng/seed").strip() == "7"


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name)
def test_ipi_parser_accepts_patched_template(path, tmp_path):
    """i-PI's own input classes read the patched template with the values mlmm run put in."""
    from ipi.inputs.simulation import InputSimulation
    from ipi.utils.io.inputs.io_xml import xml_parse_string

    tree = xmlinput.load(path)
    xmlinput.patch(tree.getroot(), init_file="init.extxyz", sockets_prefix=f"{tmp_path}/", steps=42, seed=3)
    text = ET.tostring(tree.getroot(), encoding="unicode")
    sim = InputSimulation()
    sim.parse(xml_parse_string(text).fields[0][1])
    assert sim.total_steps.fetch() == 42
    assert sim.prng.seed.fetch() == 3
    assert sim.sockets_prefix.fetch() == f"{tmp_path}/"
