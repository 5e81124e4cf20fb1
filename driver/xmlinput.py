"""Reading, checking and patching the i-PI input XML for `mlmm run`.

i-PI itself parses the file again when it starts; this module only looks at what the launcher must know
before that (which socket clients to start, where i-PI writes its outputs, the number of steps) and fills
in the run-specific parts (structure file, socket addresses, steps, seed). Every problem it finds is a
`SetupError` naming the file, the element and the fix, so a bad template fails before anything starts.
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from .errors import SetupError

# <ffsocket name=...> -> what `mlmm run` starts for it
KNOWN_CLIENTS = {"mm": "mlmm client mm (OpenMM)", "ml": "mlmm client ml (embedding-aware network)"}

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


def _text(el: ET.Element | None) -> str:
    return (el.text or "").strip() if el is not None else ""


def sockets(root: ET.Element, where: str = "input") -> list[SocketSpec]:
    """The `<ffsocket>`s of the input, validated: known names, unique, unix or inet only.

    A socket without ``mode`` is treated as unix (i-PI's own default is inet, but the launcher only opens
    network ports the user asked for explicitly).
    """
    specs: list[SocketSpec] = []
    for el in root.iter("ffsocket"):
        name = el.get("name", "")
        if name not in KNOWN_CLIENTS:
            known = ", ".join(f"'{k}' ({v})" for k, v in KNOWN_CLIENTS.items())
            raise SetupError(f"{where}: <ffsocket name='{name}'> has no client; mlmm run knows {known}; "
                             "rename the forcefield")
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


def write(tree: ET.ElementTree, path: str | Path) -> None:
    ET.indent(tree, space="  ")
    tree.write(path, encoding="unicode", xml_declaration=False)
