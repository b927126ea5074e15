"""How low-rank are the heads of a trained full-rank model?

For each head matrix W [d, d] of a checkpoint: its singular values, and the relative Frobenius
error of the best rank-r approximation (truncated SVD, Eckart-Young) for r = 1..d:
    err(r) = ||W - W_r||_F / ||W||_F = sqrt(sum_{i>r} s_i^2) / sqrt(sum_i s_i^2).
Checkpoints: a project model file (final.pt, {"model": state_dict, ...}) or the authors' plain
state dict (keys aap_norm.weight, map_norm.weight, ...). A model of several attribute fields has
an AAP and a MAP head per field (aap_<field>_norm.*), each analysed. Only torch.linalg is used.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from s3rec.analysis.atomic import save_figure, write_csv  # noqa: E402
from s3rec.model import read_state_dict  # noqa: E402
from s3rec.model.field_heads import field_head_name, fields_of_state  # noqa: E402

HEADS = ("aap", "map", "mip", "sp")
FOCUS = ("aap", "map")   # the heads the low-rank variant replaces


@dataclass
class HeadSpectrum:
    name: str
    source: str                 # the state-dict keys it came from
    singular: list[float]       # descending, length d
    rel_error: list[float]      # rel_error[r - 1] = err(r), r = 1..d

    def error_at(self, r: int) -> float:
        return self.rel_error[r - 1]


def head_matrix(state: dict, name: str, path: str = "") -> tuple[torch.Tensor, str]:
    """W [d, d] of head `name`: a full head's weight, or U V^T of a low-rank one."""
    w = state.get(f"{name}_norm.weight")
    if w is not None:
        return w.detach().double(), f"{name}_norm.weight"
    u, v = state.get(f"{name}_norm.U"), state.get(f"{name}_norm.V")
    if u is not None and v is not None:
        return (u.double() @ v.double().T), f"{name}_norm.U @ {name}_norm.V^T"
    raise KeyError(f"checkpoint {path}: no '{name}_norm.weight' (full head) or "
                   f"'{name}_norm.U'/'{name}_norm.V' (low-rank head)")


def spectrum(w: torch.Tensor) -> tuple[list[float], list[float]]:
    """(singular values, relative truncation error for r = 1..d) of W [d, d]."""
    s = torch.linalg.svdvals(w.double())                          # [d], descending
    energy = s.square()
    tail = energy.flip(0).cumsum(0).flip(0)                        # tail[i] = sum_{j>=i} s_j^2
    total = tail[0]
    # err(r) uses the values after the first r: tail[r] for r < d, 0 for r = d.
    err = torch.cat([tail[1:], torch.zeros(1, dtype=s.dtype)]) / total
    return s.tolist(), err.sqrt().tolist()


def state_head_names(state: dict) -> tuple[str, ...]:
    """The heads of a state dict: HEADS for one attribute field; with several, each field's
    `aap_<field>` and `map_<field>` (s3rec.model.field_heads), then mip and sp."""
    fields = fields_of_state(state)
    if fields is None:
        return HEADS
    return (*[field_head_name(fields, f.name, o) for o in FOCUS for f in fields], "mip", "sp")


def objective_of(head: str) -> str:
    """The objective of a head name: `aap_noise` -> `aap`."""
    return head.split("_", 1)[0]


def analyse_checkpoint(path: str | Path) -> list[HeadSpectrum]:
    state = read_state_dict(path)
    out = []
    for name in state_head_names(state):
        w, src = head_matrix(state, name, str(path))
        s, err = spectrum(w)
        out.append(HeadSpectrum(name, src, s, err))
    return out


def write_spectra_csv(spectra: list[HeadSpectrum], path: Path) -> None:
    rows = [{"head": h.name, "rank": r + 1, "singular_value": h.singular[r],
             "rel_frobenius_error": h.rel_error[r]}
            for h in spectra for r in range(len(h.singular))]
    write_csv(path, rows, ["head", "rank", "singular_value", "rel_frobenius_error"])


def spectra_figure(spectra: list[HeadSpectrum], out_stem: Path, title: str,
                   mark_ranks: list[int] = ()) -> None:
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10.5, 4))
    colors = {"aap": "tab:blue", "map": "tab:orange", "mip": "tab:gray", "sp": "tab:olive"}
    cycle = plt.get_cmap("tab10")
    for i, h in enumerate(spectra):
        focus = objective_of(h.name) in FOCUS
        style = dict(color=colors.get(h.name, cycle(i % 10)), lw=2 if focus else 1,
                     ls="-" if focus else "--",
                     label=f"{h.name.upper()}" + ("" if focus else " (full in both variants)"))
        idx = list(range(1, len(h.singular) + 1))
        a1.plot(idx, h.singular, **style)
        a2.plot(idx, h.rel_error, **style)
    a1.set_yscale("log")
    a1.set_xlabel("index i (descending)")
    a1.set_ylabel("singular value s_i (log scale)")
    a1.set_title("Singular values of the head matrices W")
    a2.set_xlabel("rank r of the truncated SVD")
    a2.set_ylabel("relative error ||W - W_r||_F / ||W||_F")
    a2.set_title("Best rank-r approximation error")
    a2.set_ylim(0, 1.02)
    for r in mark_ranks:
        a2.axvline(r, color="k", lw=0.6, alpha=0.4)
        a2.text(r, 1.0, f" r={r}", fontsize=8, va="top", rotation=90, alpha=0.7)
    a1.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, out_stem)
    plt.close(fig)
