"""Growing a trained network before fine-tuning: wider layers (:func:`grown_state`, checked by
:func:`check_widths`) and the starting embedding of an added element (:func:`like_element`). Used by
``potentials.train`` when ``[train] init_model`` is narrower than ``[model.config]`` or lacks elements."""
from __future__ import annotations

from potentials.core.errors import SetupError

WIDTHS = ("hidden", "aim_size", "out_hidden")     # layer widths that may grow when fine-tuning


def check_widths(old, new, where: str) -> None:
    """SetupError unless ``new``'s layers are ``old``'s, each as wide or wider (same passes, same depths)."""
    pairs = [(a, b) for pa, pb in zip(old.hidden, new.hidden) for a, b in zip(pa, pb)]
    pairs += list(zip(old.out_hidden, new.out_hidden)) + [(old.aim_size, new.aim_size)]
    same_depths = ([len(p) for p in old.hidden] == [len(p) for p in new.hidden]
                   and len(old.out_hidden) == len(new.out_hidden))
    if not same_depths or any(b < a for a, b in pairs):
        raise SetupError(f"init_model {where}: its layers (hidden {old.hidden}, aim_size {old.aim_size}, out_hidden "
                         f"{old.out_hidden}) may only be widened, not narrowed, deepened or removed; [model.config] "
                         f"asks for hidden {new.hidden}, aim_size {new.aim_size}, out_hidden {new.out_hidden}")


def grown_state(old: dict, new: dict) -> dict:
    """``new`` (a freshly initialised, possibly wider network's state) with ``old``'s weights in the leading block
    of every tensor: the network computes exactly what ``old`` computed (Net2Net-style widening, Chen, Goodfellow
    & Shlens, ICLR 2016), because every weight that reads an added unit (a Linear's added columns) starts at zero;
    the added units' own weights keep their random start, so training grows them from there."""
    out = dict(new)
    for k, v in old.items():
        t = new[k]
        if v.shape == t.shape:
            out[k] = v.clone()
            continue
        if v.dim() != t.dim() or any(a > b for a, b in zip(v.shape, t.shape)):
            raise SetupError(f"weight {k}: shape {tuple(v.shape)} cannot grow into {tuple(t.shape)}")
        grown = t.clone()
        if grown.dim() == 2:
            grown[:, v.shape[1]:] = 0.0
        grown[tuple(slice(0, n) for n in v.shape)] = v
        out[k] = grown
    return out


def like_element(z: int, known: list[int]) -> int:
    """The known element whose embedding a new element starts from: one of its periodic-table group (the
    nearest period), else the nearest atomic number."""
    same = [k for k in known if GROUPS.get(k) is not None and GROUPS.get(k) == GROUPS.get(z)]
    return min(same or known, key=lambda k: abs(k - z))


GROUPS = {1: 1, 3: 1, 11: 1, 19: 1, 4: 2, 12: 2, 20: 2, 5: 13, 13: 13, 6: 14, 14: 14, 7: 15, 15: 15, 8: 16, 16: 16,
          34: 16, 9: 17, 17: 17, 35: 17, 53: 17}
