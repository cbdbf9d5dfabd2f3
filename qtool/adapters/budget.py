"""Where an AdaLoRA rank budget went: the final rank of every module, grouped by layer and by module type, and the
heat map layer × module type. Torch-free (the CLI reads it from a trained adapter before anything heavy loads);
matplotlib is imported only to draw the heat map, and is optional (``pip install qtool[plot]``).

The paper's finding to check with it (Zhang et al. 2023, Fig. 1 and §4.4): the budget goes to the FFN modules and the
top layers, and away from the attention projections of the bottom layers.
"""
from __future__ import annotations

import re

BUDGET_JSON = "adalora_budget.json"  # beside the adapter: RankAllocator.report() with the summary below
HEATMAP_PNG = "adalora_budget.png"
# Llama-family module types in forward order; others follow in the order they first appear
_TYPE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PATH_RE = re.compile(r"\.(?P<layer>\d+)\.(?:.*\.)?(?P<name>[^.]+)$")


def split_path(path: str) -> tuple[int, str]:
    """``model.layers.3.mlp.down_proj`` -> ``(3, "down_proj")``; ValueError for a path without a layer index."""
    m = _PATH_RE.search(path)
    if m is None:
        raise ValueError(f"module path {path!r} has no layer index")
    return int(m["layer"]), m["name"]


def summarise(ranks: dict[str, int], init_rank: int) -> dict:
    """The budget of ``ranks`` (module path -> final rank; every AdaLoRA module, pruned to 0 or not) started at
    ``init_rank`` per module. Module types in forward order (q, k, v, o, gate, up, down; others as they first appear).

    Returns ``{"init_rank", "n_modules", "init_budget", "final_budget", "module_types": [...], "layers": [...],
    "grid": [[rank or None, ...] per layer], "by_layer": [{"layer", "rank", "share"}], "by_type": [{"module", "rank",
    "mean", "share"}], "modules": ranks}``; ``share`` is the fraction of the final budget, ``mean`` the average rank
    over the layers that have the module. ``grid`` holds None where a layer has no such module."""
    cells: dict[tuple[int, str], int] = {}
    types: list[str] = []
    for path, rank in ranks.items():
        layer, name = split_path(path)
        cells[(layer, name)] = cells.get((layer, name), 0) + int(rank)
        if name not in types:
            types.append(name)
    types.sort(key=lambda t: _TYPE_ORDER.index(t) if t in _TYPE_ORDER else len(_TYPE_ORDER))
    layers = sorted({layer for layer, _ in cells})
    total = sum(cells.values())

    def share(n: int) -> float:
        return n / total if total else 0.0

    grid = [[cells.get((layer, t)) for t in types] for layer in layers]
    by_layer = [{"layer": layer, "rank": sum(r or 0 for r in row), "share": share(sum(r or 0 for r in row))}
                for layer, row in zip(layers, grid)]
    by_type = []
    for j, t in enumerate(types):
        column = [row[j] for row in grid if row[j] is not None]
        by_type.append({"module": t, "rank": sum(column), "mean": sum(column) / len(column),
                        "share": share(sum(column))})
    return {"init_rank": init_rank, "n_modules": len(ranks), "init_budget": init_rank * len(ranks),
            "final_budget": total, "module_types": types, "layers": layers, "grid": grid, "by_layer": by_layer,
            "by_type": by_type, "modules": dict(ranks)}


def heatmap_png(summary: dict, title: str = "AdaLoRA ranks") -> tuple[bytes | None, str]:
    """``(PNG bytes, "")`` of the heat map layer (rows, bottom layer first) × module type (columns), each cell
    annotated with its rank; ``(None, why)`` when matplotlib is not installed (training must not fail for a plot)."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend
    except ImportError:
        return None, "matplotlib is not installed (pip install 'qtool[plot]')"
    import io

    types, layers, grid = summary["module_types"], summary["layers"], summary["grid"]
    values = [[float("nan") if r is None else r for r in row] for row in grid]
    fig = Figure(figsize=(1.0 + 0.9 * len(types), 1.2 + 0.28 * len(layers)), dpi=110)
    ax = fig.add_subplot()
    image = ax.imshow(values, aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=summary["init_rank"])
    ax.set_xticks(range(len(types)), [t.removesuffix("_proj") for t in types])
    ax.set_yticks(range(len(layers)), [str(i) for i in layers])
    ax.set_xlabel("module")
    ax.set_ylabel("layer")
    ax.set_title(f"{title}\n{summary['final_budget']} of {summary['init_budget']} triplets kept "
                 f"(init rank {summary['init_rank']})", fontsize=9)
    if len(layers) * len(types) <= 400:
        for i, row in enumerate(grid):
            for j, r in enumerate(row):
                if r is not None:
                    ax.text(j, i, str(r), ha="center", va="center", fontsize=7,
                            color="white" if r < summary["init_rank"] / 2 else "black")
    fig.colorbar(image, ax=ax, label="final rank")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue(), ""
