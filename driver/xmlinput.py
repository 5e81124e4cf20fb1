"""Reading, checking and patching the i-PI input XML for `mlmm run`.

i-PI itself parses the file again when it starts; this module only looks at what the launcher must know
before that (which socket clients to start, where i-PI writes its outputs, the number of steps) and fills
in the run-specific parts (structure file, socket addresses, steps, seed). Every problem it finds is a
`SetupError` naming the file, the element and the fix, so a bad template fails before anything starts.
It also reads what a run needs back from i-PI's RESTART (the step, the positions: bohr there, nm here).
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from coupling.engines import ENGINES
from potentials.core.errors import SetupError
from potentials.core.units import NM_PER_BOHR

# i-PI defaults (ipi/inputs/outputs.py, ipi/inputs/forcefields.py) needed to predict file names and sockets
DEFAULT_PREFIX = "i-pi"
DEFAULT_PROPERTIES = "out"
DEFAULT_TRAJECTORY = "traj"
DEFAULT_PORT = 65535


@dataclass(frozen=True)
class SocketSpec:
    """One `<ffsocket>` as the launcher needs it.

    ``address`` is the unix socket name (the file is ``sockets_prefix + address``) or the inet host.
    """

    name: str
    mode: str                  # "unix" | "inet"
    address: str
    port: int | None = None


@dataclass(frozen=True)
class TrajectorySpec:
    """A `<trajectory>` output whose content is atomic positions (the ones converted to NetCDF)."""

    filename: str              # i-PI's filename attribute (without prefix)
    what: str                  # "positions" (one file per bead) or "x_centroid" (one file)
    format: str                # xyz | ase | pdb | bin
    stride: int


def load(path: str | Path) -> ET.ElementTree:
    """Parse an i-PI XML file; a missing file or malformed XML is one `SetupError` line with line/column."""
    path = Path(path)
    if not path.is_file():
        raise SetupError(f"i-PI input {path} not found; start from inputs/templates/nvt_bussi.xml")
    try:
        tree = ET.parse(path)
    except ET.ParseError as exc:
        line, col = exc.position
        reason = str(exc).split(":")[0]
        raise SetupError(f"{path}:{line}:{col + 1}: malformed XML ({reason}); fix the file at that position") \
            from None
    if tree.getroot().tag != "simulation":
        raise SetupError(f"{path}: root element is <{tree.getroot().tag}>, an i-PI input starts with <simulation>")
    return tree


def load_state(path: str | Path) -> ET.ElementTree:
    """An i-PI RESTART or checkpoint file (see :func:`load`). i-PI writes only non-default attributes, so an
    `<ffsocket>` without ``mode`` there is i-PI's default, inet (whereas :func:`sockets` reads a template's
    missing mode as unix); it is made explicit."""
    tree = load(path)
    for el in tree.getroot().iter("ffsocket"):
        el.set("mode", el.get("mode", "inet"))
    return tree


def _text(el: ET.Element | None) -> str:
    return (el.text or "").strip() if el is not None else ""


def sockets(root: ET.Element, where: str = "input") -> list[SocketSpec]:
    """The `<ffsocket>`s of the input, validated: names that are client kinds (:data:`coupling.engines.ENGINES`;
    `mlmm run` starts ``mlmm client NAME`` for each), unique, unix or inet only.

    A socket without ``mode`` is treated as unix (i-PI's own default is inet, but the launcher only opens
    network ports the user asked for explicitly).
    """
    specs: list[SocketSpec] = []
    for el in root.iter("ffsocket"):
        name = el.get("name", "")
        if name not in ENGINES:
            known = ", ".join(f"'{k}'" for k in ENGINES.names())
            raise SetupError(f"{where}: <ffsocket name='{name}'> has no client; mlmm run starts `mlmm client NAME` "
                             f"for the client kinds {known}; rename the forcefield")
        if any(s.name == name for s in specs):
            raise SetupError(f"{where}: two <ffsocket>s are named '{name}'; each client needs its own socket")
        mode = el.get("mode", "unix")
        if mode not in ("unix", "inet"):
            raise SetupError(f"{where}: <ffsocket name='{name}' mode='{mode}'>: mlmm clients speak 'unix' or "
                             "'inet' sockets only; use mode='unix'")
        address = _text(el.find("address"))
        if mode == "unix":
            specs.append(SocketSpec(name, "unix", address or name))
        else:
            port_text = _text(el.find("port"))
            try:
                port = int(port_text) if port_text else DEFAULT_PORT
            except ValueError:
                raise SetupError(f"{where}: <ffsocket name='{name}'><port>{port_text}</port> is not an integer") \
                    from None
            specs.append(SocketSpec(name, "inet", address or "localhost", port))
    return specs


def forcefield_names(root: ET.Element) -> list[str]:
    """Names of all forcefields defined at the top level (`<ffsocket>`, `<ffdirect>`, `<fflj>`, ...)."""
    return [el.get("name", "") for el in root if el.tag.startswith("ff")]


def force_components(root: ET.Element, where: str = "input") -> list[str]:
    """Forcefield name of each `<force>` of the first `<system>`, in order: the index `i` of i-PI's
    ``pot_component_raw(i)``. Raises if a force names an undefined forcefield."""
    defined = forcefield_names(root)
    systems = root.findall("system")
    if not systems:
        raise SetupError(f"{where}: no <system> element; start from inputs/templates/nvt_bussi.xml")
    components = []
    for system in systems:
        for force in system.iter("force"):
            ff = force.get("forcefield", "")
            if ff not in defined:
                raise SetupError(f"{where}: <force forcefield='{ff}'> refers to no forcefield; defined: "
                                 f"{defined or 'none'}")
            if system is systems[0]:
                components.append(ff)
    if not components:
        raise SetupError(f"{where}: <system><forces> lists no <force>; add <force forcefield='mm'/>")
    return components


def total_steps(root: ET.Element) -> int | None:
    """``<total_steps>`` or None if the input sets none (i-PI then runs until stopped)."""
    text = _text(root.find("total_steps"))
    return int(float(text)) if text else None


def timestep_ps(root: ET.Element) -> float | None:
    """MD time step in ps from the first ``<dynamics><timestep units=...>`` (i-PI default unit: a.u.)."""
    from ipi.utils.units import unit_to_internal, unit_to_user

    el = root.find("system/motion/dynamics/timestep")
    if el is None:
        return None
    value = float(_text(el))
    return float(unit_to_user("time", "picosecond", unit_to_internal("time", el.get("units", "atomic_unit"),
                                                                     value)))


def output_prefix(root: ET.Element) -> str:
    out = root.find("output")
    return out.get("prefix", DEFAULT_PREFIX) if out is not None else DEFAULT_PREFIX


def properties_file(root: ET.Element) -> str | None:
    """File name (relative to i-PI's cwd) of the first `<properties>` output, or None."""
    el = root.find("output/properties")
    if el is None:
        return None
    return f"{output_prefix(root)}.{el.get('filename', DEFAULT_PROPERTIES)}"


def position_trajectories(root: ET.Element) -> list[TrajectorySpec]:
    """The `<trajectory>` outputs that hold positions (``positions`` or ``x_centroid``, any units)."""
    out = []
    for el in root.findall("output/trajectory"):
        what = re.split(r"[{(]", _text(el))[0]
        if what in ("positions", "x_centroid"):
            out.append(TrajectorySpec(el.get("filename", DEFAULT_TRAJECTORY), what, el.get("format", "xyz"),
                                      int(el.get("stride", "1"))))
    return out


def _set_child(parent: ET.Element, tag: str, text: str, index: int | None = None) -> ET.Element:
    el = parent.find(tag)
    if el is None:
        el = ET.Element(tag)
        if index is None:
            parent.append(el)
        else:
            parent.insert(index, el)
    el.text = f" {text} "
    return el


def patch(root: ET.Element, *, init_file: str | None, sockets_prefix: str | None, steps: int | None = None,
          seed: int | None = None) -> None:
    """Fill in the run-specific parts of the input, in place.

    Parameters
    ----------
    init_file : str or None
        Extended-XYZ structure (Å, masses column) read by i-PI with ``<file mode='ase'>``; replaces any
        ``<file>`` of every ``<system><initialize>``. None leaves the systems alone (an i-PI RESTART file,
        whose systems hold their full state).
    sockets_prefix : str or None
        Prefix of the unix socket paths (``<simulation sockets_prefix=...>``); each unix ``<ffsocket>`` gets
        ``<address>`` = its name and ``mode='unix'``. None leaves sockets untouched.
    steps : int, optional
        Overrides ``<total_steps>``.
    seed : int, optional
        Overrides ``<prng><seed>``.
    """
    if sockets_prefix is not None:
        root.set("sockets_prefix", sockets_prefix)
        for el in root.iter("ffsocket"):
            if el.get("mode", "unix") == "unix":
                el.set("mode", "unix")
                _set_child(el, "address", el.get("name", ""))
    for system in (root.findall("system") if init_file is not None else ()):
        init = system.find("initialize")
        if init is None:
            init = ET.Element("initialize", nbeads="1")
            system.insert(0, init)
        for old in init.findall("file"):
            init.remove(old)
        # first child: velocities mode='thermal' needs the masses the file provides
        file_el = ET.Element("file", mode="ase")
        file_el.text = f" {init_file} "
        init.insert(0, file_el)
    if steps is not None:
        _set_child(root, "total_steps", str(int(steps)), index=1)
    if seed is not None:
        prng = root.find("prng")
        if prng is None:
            prng = ET.Element("prng")
            root.insert(1, prng)
        _set_child(prng, "seed", str(int(seed)))


def watch_remote(root: ET.Element, name: str, timeout_s: float) -> None:
    """Let i-PI itself stop the run when a client of the `<ffsocket name=NAME>` dies or hangs (the clients on
    other nodes, which the supervisor cannot see), in place: ``<exit_on_disconnect>`` makes i-PI write RESTART
    and exit when it drops a client, ``<timeout>`` (s; 0 = none) drops one whose request has run that long.
    Works with consolidated messages (batching) because `mlmm client` reads GETFORCE before computing, so a
    killed client closes with FIN (ipi.md §2.7)."""
    for el in root.iter("ffsocket"):
        if el.get("name") == name:
            _set_child(el, "exit_on_disconnect", "true")
            if timeout_s > 0:
                _set_child(el, "timeout", f"{float(timeout_s):g}")


def nbeads(root: ET.Element) -> int:
    """Number of beads of the ring polymer (``<initialize nbeads>`` of the first system; 1 if not set)."""
    init = root.find("system/initialize")
    text = init.get("nbeads", "1") if init is not None else "1"
    try:
        return int(text)
    except ValueError:
        raise SetupError(f"<initialize nbeads='{text}'> is not an integer") from None


def beads_per_forcefield(root: ET.Element, where: str = "input") -> dict[str, int]:
    """Beads each forcefield is evaluated on per force evaluation of the first system, summed over the
    `<force>`s that use it: ``<force nbeads='k'>`` contracts to k beads (ring-polymer contraction, ipi.md §2.3);
    0, absent or more than the system's beads means the full ring polymer; ``weight='0'`` is never evaluated."""
    full = nbeads(root)
    counts: dict[str, int] = {}
    system = root.find("system")
    for force in (system.iter("force") if system is not None else ()):
        ff = force.get("forcefield", "")
        try:
            k = int(force.get("nbeads", "0"))
            weight = float(force.get("weight", "1"))
        except ValueError:
            raise SetupError(f"{where}: <force forcefield='{ff}'>: nbeads/weight must be numbers") from None
        if weight != 0.0:
            counts[ff] = counts.get(ff, 0) + (full if k <= 0 or k > full else k)
    return counts


def set_beads(root: ET.Element, n: int, where: str = "input") -> None:
    """Set the ring-polymer size of every system to ``n`` beads (``mlmm run --beads``), in place.

    A contracted `<force nbeads='k'>` with k > n is lowered to n (i-PI would treat it as the full polymer
    anyway)."""
    if n < 1:
        raise SetupError(f"--beads {n}: must be a positive number of beads")
    for system in root.findall("system"):
        init = system.find("initialize")
        if init is None:
            init = ET.Element("initialize")
            system.insert(0, init)
        init.set("nbeads", str(int(n)))
        for force in system.iter("force"):
            if int(force.get("nbeads", "0") or 0) > n:
                force.set("nbeads", str(int(n)))


def fit_batches(root: ET.Element, clients: dict[str, int]) -> dict[str, int]:
    """Size each batched socket's ``<batch_size>`` to the beads its forcefield sees, shared among its clients.

    i-PI pads a short batch by repeating the last structure (ipi.md §1.6), so a batch larger than the beads a
    client gets per step wastes evaluations; with c clients on a forcefield that sees b beads each request
    carries ceil(b / c) beads, so every client gets work. Only sockets that ask for batching
    (``batch_size`` > 1) are changed. ``clients``: forcefield name -> number of clients. Returns the new sizes.
    """
    seen = beads_per_forcefield(root)
    sizes = {}
    for el in root.iter("ffsocket"):
        bs = el.find("batch_size")
        name = el.get("name", "")
        if bs is None or int(_text(bs) or 1) <= 1 or name not in seen:
            continue
        size = max(1, -(-seen[name] // max(1, clients.get(name, 1))))
        bs.text = f" {size} "
        sizes[name] = size
    return sizes


def restart_step(path: str | Path) -> int | None:
    """The step an i-PI RESTART file (or checkpoint) holds the state of: ``<step>``, the number of MD steps done;
    None if the file is missing or unreadable (i-PI was killed before writing it)."""
    try:
        text = ET.parse(path).getroot().findtext("step")
    except (OSError, ET.ParseError):
        return None
    try:
        return int(float(text)) if text and text.strip() else None
    except ValueError:
        return None


def restart_centroid_nm(path: str | Path) -> np.ndarray:
    """The positions (nm, shape (natoms, 3)) of the state in i-PI's RESTART ``path``: the ring polymer's centroid
    (the beads' mean; the positions themselves for one bead). i-PI stores them in bohr.

    Raises OSError or ET.ParseError for a missing or malformed file, ValueError (or TypeError) for one without
    readable ``<system><beads>``.
    """
    beads = ET.parse(path).getroot().find("system/beads")
    if beads is None:
        raise ValueError(f"{path}: no <system><beads>")
    q = np.array([float(v) for v in re.split(r"[\s,\[\]]+", beads.findtext("q", "")) if v])
    return q.reshape(int(beads.get("nbeads")), int(beads.get("natoms")), 3).mean(axis=0) * NM_PER_BOHR


def write(tree: ET.ElementTree, path: str | Path) -> None:
    ET.indent(tree, space="  ")
    tree.write(path, encoding="unicode", xml_declaration=False)


# i-PI quantities that read the forces' virial (ipi/engine/barostats.py, ipi/engine/properties.py). A kind is
# "isotropic" when only the trace enters (the scalar pressure, isotropic volume moves) and "full" when the
# tensor does (cell-shape moves, stress tensors); the MM client's cost differs (potentials.openmm_engine).
_VIRIAL_DYNAMICS = {"npt": "isotropic", "scnpt": "isotropic", "nst": "full"}
_VIRIAL_BAROSTATS = {"isotropic": "isotropic", "sc-isotropic": "isotropic", "stochastic-rescaling": "isotropic",
                     "flexible": "full", "anisotropic": "full"}
_VIRIAL_PROPERTIES = {"pressure_md": "isotropic", "pressure_cv": "isotropic", "pressure_tdsc": "isotropic",
                      "vir_tdsc": "isotropic", "stress_md": "full", "virial_md": "full", "stress_cv": "full",
                      "virial_cv": "full", "vir_component": "full", "vir_component_raw": "full"}


def _virial_uses(root: ET.Element) -> list[tuple[str, str]]:
    """(what, kind) for every part of the input that reads the virial; kind is "isotropic" or "full"."""
    uses = []
    for dyn in root.iter():
        if not (isinstance(dyn.tag, str) and dyn.tag.endswith("dynamics")):
            continue
        mode = dyn.get("mode", "nve").strip()
        if mode not in _VIRIAL_DYNAMICS:
            continue                                   # a barostat outside npt/nst/scnpt is never stepped
        kind = _VIRIAL_DYNAMICS[mode]
        baro = dyn.find("barostat")
        baro_mode = baro.get("mode", "dummy").strip() if baro is not None else "dummy"
        if _VIRIAL_BAROSTATS.get(baro_mode) == "full":
            kind = "full"
        uses.append((f"<{dyn.tag} mode='{mode}'>" + (f" (barostat mode='{baro_mode}')" if baro is not None
                                                     else ""), kind))
    for el in root.findall("output/properties"):
        # names only: drop units {..} and arguments (..), then split the list
        text = re.sub(r"\{[^}]*\}|\([^)]*\)", "", _text(el))
        for name in (n for n in re.split(r"[\s,\[\]]+", text) if n):
            if name in _VIRIAL_PROPERTIES:
                uses.append((f"the property {name}", _VIRIAL_PROPERTIES[name]))
    return uses


def needs_virial(root: ET.Element) -> str | None:
    """What in the i-PI input reads the forces' virial (constant-pressure/stress dynamics or a pressure,
    stress or virial property), as a short description such as ``"<dynamics mode='npt'> (barostat
    mode='isotropic'), the property pressure_md"``; None if nothing does (NVE/NVT/PIMD-NVT printing no pressure), in
    which case a client may return a zero virial."""
    uses = _virial_uses(root)
    return ", ".join(dict.fromkeys(what for what, _ in uses)) if uses else None


def virial_kind(root: ET.Element) -> str | None:
    """How much of the virial the input reads: ``"full"`` (the tensor: nst dynamics, flexible/anisotropic
    barostats, stress or virial-tensor properties), ``"isotropic"`` (only its trace: isotropic barostats, the
    scalar pressure) or None (nothing; see :func:`needs_virial`). Matches the MM client's ``virial`` modes
    (:class:`potentials.openmm_engine.OpenMMEngine`; None there is ``"none"``)."""
    kinds = {kind for _, kind in _virial_uses(root)}
    return "full" if "full" in kinds else ("isotropic" if kinds else None)
