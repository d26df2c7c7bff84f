"""The report's sections in the layouts of the paper (Tables 2, 3, 5; Figs. 3, 4, 5), each built from the runs
that feed it and saying "not run" when there are none. Scores are shown in percent, as in the paper;
cells are the mean with its 95% bootstrap interval; the best / second-best value of a column is marked."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from haps.labels import METHOD_LABELS
from haps.report import plots
from haps.report.render import BEST, NA, REF, SECOND, Cell, Document, Heading, Image, Para, Table
from haps.report.results import MAIN, TASK_TITLES, Run

#: Table 2's rows, in the paper's order (baselines first, HAPS last); others follow, the oracle closes
MAIN_ORDER = ("random", "best_static", "knn", "routellm_mf", "routellm_clf", "graphrouter", "irt", "sft", "haps")
ABLATION_ONLY = ("haps-no-lora",)
PAPER_REGIMES = ((0.8, 0.2), (0.5, 0.5), (0.2, 0.8))
REGIME_NAMES = {(0.8, 0.2): "Performance-First", (0.5, 0.5): "Balanced", (0.2, 0.8): "Cost-First"}
NOT_RUN = "not run"


def _pct_cell(iv: Mapping[str, float] | None, failed: int = 0) -> Cell:
    if not iv:
        return Cell("—", NA)
    sub = f"[{100 * iv['low']:.1f}, {100 * iv['high']:.1f}]"
    if failed:
        sub += f" {failed} failed"
    return Cell(f"{100 * iv['mean']:.1f}", sub=sub)


def _mark(cells: Sequence[Cell], values: Sequence[float | None], higher: bool = True) -> None:
    """Mark the best and second-best distinct value among ``values`` (None: not ranked)."""
    vals = sorted({v for v in values if v is not None}, reverse=higher)
    for c, v in zip(cells, values, strict=True):
        if v is None:
            continue
        if v == vals[0]:
            c.cls = BEST
        elif len(vals) > 1 and v == vals[1]:
            c.cls = SECOND


def _ranked_table(caption: str, runs: Sequence[Run], rows: Sequence[tuple[str, Callable[[Run], Mapping | None]]],
                  *, ref_rows: Sequence[tuple[str, Callable[[Run], Mapping | None]]] = (), note: str = "",
                  groups: Mapping[int, str] | None = None) -> Table:
    """Rows x runs of score cells; ``rows`` are ranked per column, ``ref_rows`` (the oracle) are not.
    Each getter returns a method's summary entry (or None: not run). ``groups``: row index -> a group title
    shown before it."""
    body: list[list[Cell]] = [[Cell(name)] for name, _ in rows]
    for run in runs:
        col: list[Cell] = []
        vals: list[float | None] = []
        for _, get in rows:
            m = get(run)
            col.append(_pct_cell(m.get("score"), m.get("failed", 0)) if m else Cell(NOT_RUN, NA))
            vals.append(m["score"]["mean"] if m and m.get("score") else None)
        _mark(col, vals)
        for r, c in zip(body, col, strict=True):
            r.append(c)
    out: list[list[Cell] | str] = []
    for i, r in enumerate(body):
        if groups and i in groups:
            out.append(groups[i])
        out.append(r)
    for name, get in ref_rows:
        r = [Cell(name, REF)]
        for run in runs:
            m = get(run)
            c = _pct_cell(m.get("score") if m else None)
            c.cls = REF if m else NA
            r.append(c)
        out.append(r)
    return Table(caption, ["method"] + [r.column for r in runs], out, note)


def _method(name: str) -> Callable[[Run], Mapping | None]:
    return lambda run: run.methods.get(name)


def _label(runs: Sequence[Run], name: str) -> str:
    for r in runs:
        if name in r.methods:
            return r.methods[name]["label"]
    return METHOD_LABELS.get(name, name)


def _variant(runs_by_key: Mapping[tuple[str, str, str], Run], variant: str, method: str = "haps"):
    return lambda run: (runs_by_key.get((run.task, run.setting, variant)) or _NO).methods.get(method)


class _NoRun:
    methods: dict[str, Any] = {}


_NO = _NoRun()

SCORE_NOTE = ("Score in percent (F1 for HotpotQA, accuracy for MMLU): the mean over the test problems with its "
              "95% bootstrap interval; failed episodes are not scored and are counted beside the interval. "
              "Bold / dark: best of the column; italic / light: second best.")


# ------------------------------------------------------------------------------------------ Table 2
def main_table(doc: Document, runs: Sequence[Run]) -> bool:
    doc.add(Heading("Main results (Table 2)", anchor="main"))
    mains = [r for r in runs if r.variant == MAIN and not r.mixed]
    if not mains:
        doc.add(Para(f"{NOT_RUN}: no main run of an open-weights pool (RESULTS/<task>/<setting>/summary.json "
                     "from haps eval)."))
        return False
    names = _main_methods(mains)
    rows = [(_label(mains, n), _method(n)) for n in names]
    doc.add(_ranked_table("Routers on the test problems", mains, rows,
                          ref_rows=[("oracle (upper bound)", _method("oracle"))], note=SCORE_NOTE))
    return True


def _main_methods(runs: Sequence[Run]) -> list[str]:
    present = [n for r in runs for n in r.methods]
    extra = [n for n in dict.fromkeys(present) if n not in MAIN_ORDER and n != "oracle" and not n.startswith("static:")
             and n not in ABLATION_ONLY]
    return [n for n in MAIN_ORDER if n in present] + extra


# ------------------------------------------------------------------------------------------ Table 3
def ablation_table(doc: Document, runs: Sequence[Run], by_key) -> bool:
    doc.add(Heading("Ablations (Table 3)", anchor="ablations"))
    mains = [r for r in runs if r.variant == MAIN and not r.mixed]
    if not mains:
        doc.add(Para(f"{NOT_RUN}: no main run of an open-weights pool."))
        return False
    rows: list[tuple[str, Callable]] = [("w/o High-Level (Random)", _method("random"))]
    groups = {0: "High-level router ablation"}
    two = all(len(r.summary.get("pool", {}).get("models", [])) == 2 for r in mains)
    statics = _static_rows(mains, two)
    groups[1] = "w/o High-Level (Fixed)" if statics else ""
    rows += statics
    groups[len(rows)] = "Low-level router ablation"
    rows.append(("w/o Low-Level Router", lambda run: run.methods.get("haps-no-lora")
                 or _variant(by_key, "no-lora")(run) or _variant(by_key, "no-lora", "haps-no-lora")(run)))
    rows.append(("w/o Parameter Sharing", _variant(by_key, "no-sharing")))
    rows.append(("HAPS", _method("haps")))
    groups = {k: v for k, v in groups.items() if v}
    note = SCORE_NOTE
    if two:
        sides = "; ".join(f"{r.column}: Left = {r.summary['pool']['models'][0]['name']}, Right = "
                          f"{r.summary['pool']['models'][1]['name']}" for r in mains)
        note += f" Left / Right: the first / second model of the pool ({sides})."
    note += (" w/o High-Level rows are assignments without adapters; w/o Low-Level Router is HAPS's routing with "
             "its adapters off (method haps-no-lora, or a no-lora/ run); w/o Parameter Sharing comes from "
             "no-sharing/ runs.")
    doc.add(_ranked_table("HAPS variants and the full model", mains, rows, note=note, groups=groups))
    missing = [name for name, get in rows if not any(get(r) for r in mains)]
    if missing:
        doc.add(Para(f"{NOT_RUN}: {', '.join(missing)}."))
    return True


def _static_rows(mains: Sequence[Run], two: bool) -> list[tuple[str, Callable]]:
    """One row per static assignment: by model position (Left / Right) for two-model pools, else by label."""
    if two:
        def by_pos(pos: tuple[int, ...]):
            def get(run: Run):
                names = [m["name"] for m in run.summary["pool"]["models"]]
                key = ",".join(f"{role}={names[p]}" for role, p in zip(run.summary["roles"], pos, strict=True))
                return run.methods.get(f"static:{key}")
            return get

        roles = mains[0].summary["roles"]
        import itertools

        out = []
        for pos in itertools.product((0, 1), repeat=len(roles)):
            name = ", ".join(f"{r.title()}={'Left' if p == 0 else 'Right'}" for r, p in zip(roles, pos, strict=True))
            out.append((name, by_pos(pos)))
        return [(n, g) for n, g in out if any(g(r) for r in mains)]
    labels: dict[str, None] = {}
    for r in mains:
        for n, m in r.methods.items():
            if n.startswith("static:"):
                labels.setdefault(m["label"], None)

    def by_label(label: str):
        return lambda run: next((m for n, m in run.methods.items() if n.startswith("static:") and m["label"] == label),
                                None)

    return [(lab, by_label(lab)) for lab in labels]


# ------------------------------------------------------------------------------------------ Fig. 3
def sharing_section(doc: Document, runs: Sequence[Run], by_key, out: Path, images: list) -> bool:
    doc.add(Heading("Parameter sharing (Fig. 3)", anchor="sharing"))
    pairs = [(r, by_key[(r.task, r.setting, "no-sharing")]) for r in runs
             if r.variant == MAIN and (r.task, r.setting, "no-sharing") in by_key]
    if not pairs:
        doc.add(Para(f"{NOT_RUN}: no RESULTS/<task>/<setting>/no-sharing/summary.json (haps eval of the decoupled "
                     "variant: high-level router frozen, low-level router on its own backbone, as method haps)."))
        return False
    mains = [m for m, _ in pairs]
    rows = [("HAPS", _method("haps")), ("HAPS (w/o Parameter Sharing)", _variant(by_key, "no-sharing"))]
    doc.add(_ranked_table("HAPS with and without parameter sharing", mains, rows, note=SCORE_NOTE))
    path = plots.grouped_bars(out / "fig3_sharing.png", [m.column for m in mains],
                              {"HAPS": [m.score("haps") for m in mains],
                               "w/o Parameter Sharing": [v.score("haps") for _, v in pairs]},
                              ylabel="score (%)", title="Parameter sharing (Fig. 3)")
    images.append(path)
    doc.add(Image(path, "Fig. 3: HAPS with and without parameter sharing",
                  "Bars: mean score; whiskers: 95% bootstrap interval."))
    return True


# ------------------------------------------------------------------------------------------ Fig. 4
def depth_section(doc: Document, runs: Sequence[Run], by_key, out: Path, images: list) -> bool:
    doc.add(Heading("LoRA depth (Fig. 4)", anchor="depth"))
    depth_runs = [r for r in runs if r.depth() is not None]
    if not depth_runs:
        doc.add(Para(f"{NOT_RUN}: no RESULTS/<task>/<setting>/depth-<k>/summary.json (haps eval of HAPS with LoRA "
                     "on the o_proj of the last k layers, as method haps)."))
        return False
    ks = sorted({r.depth() for r in depth_runs})
    settings = list(dict.fromkeys((r.task, r.setting) for r in depth_runs))
    header = ["setting"] + [f"l{k}" for k in ks] + ["best baseline"]
    rows: list[list[Cell] | str] = []
    for task in dict.fromkeys(t for t, _ in settings):
        lines, base = {}, {}
        for t, s in settings:
            if t != task:
                continue
            col = next(r.column for r in depth_runs if (r.task, r.setting) == (t, s))
            cells = [Cell(col)]
            vals = []
            pts = []
            for k in ks:
                r = by_key.get((t, s, f"depth-{k}"))
                iv = r.score("haps") if r else None
                cells.append(_pct_cell(iv) if r else Cell(NOT_RUN, NA))
                vals.append(iv["mean"] if iv else None)
                pts.append((k, iv))
            _mark(cells[1:], vals)
            b = _best_baseline(by_key.get((t, s, MAIN)))
            cells.append(Cell(f"{100 * b[1]:.1f}", REF, sub=b[0]) if b else Cell(NOT_RUN, NA))
            rows.append(cells)
            lines[col] = pts
            if b:
                base[col] = b[1]
        path = plots.depth_lines(out / f"fig4_depth_{_slug(task)}.png", lines, base,
                                  title=f"LoRA depth: {TASK_TITLES.get(task, task)}")
        images.append(path)
        doc.add(Image(path, f"Fig. 4: HAPS score against LoRA depth ({task})",
                      "Markers: mean score with 95% bootstrap intervals; dashed: the setting's best baseline "
                      "(main run, oracle and HAPS excluded)."))
    doc.add(Table("HAPS score by LoRA depth l_k", header, rows, SCORE_NOTE))
    return True


def _best_baseline(run: Run | None) -> tuple[str, float] | None:
    if run is None:
        return None
    best = None
    for n, m in run.methods.items():
        if n in ("oracle", *ABLATION_ONLY) or n.startswith("haps") or not m.get("score"):
            continue
        if best is None or m["score"]["mean"] > best[1]:
            best = (m["label"], m["score"]["mean"])
    return best


# ------------------------------------------------------------------------------------------ Table 5
def tradeoff_section(doc: Document, runs: Sequence[Run], by_key, out: Path, images: list) -> bool:
    doc.add(Heading("Cost trade-off (Table 5)", anchor="tradeoff"))
    tr = [r for r in runs if r.tradeoff() is not None]
    any_table = False
    if not tr:
        doc.add(Para(f"{NOT_RUN}: no RESULTS/<task>/<setting>/tradeoff-<alpha>-<beta>/summary.json (haps eval "
                     "--reward tradeoff --alpha A --beta B; the paper's regimes 0.8/0.2, 0.5/0.5, 0.2/0.8)."))
    for task, setting in dict.fromkeys((r.task, r.setting) for r in tr):
        regimes = sorted(set(PAPER_REGIMES) | {r.tradeoff() for r in tr if (r.task, r.setting) == (task, setting)},
                         key=lambda ab: -ab[0])
        reg_runs = [by_key.get((task, setting, f"tradeoff-{a:g}-{b:g}")) or _find_regime(tr, task, setting, (a, b))
                    for a, b in regimes]
        doc.add(_tradeoff_table(task, setting, regimes, reg_runs))
        any_table = True
    return any_table


def pareto_section(doc: Document, runs: Sequence[Run], out: Path, images: list) -> bool:
    """A cost-vs-score plot of every method of every main run (under the trade-off section)."""
    mains = [r for r in runs if r.variant == MAIN]
    doc.add(Heading("Cost vs quality of every method", level=3, anchor="pareto"))
    if not mains:
        doc.add(Para(f"{NOT_RUN}: no main run."))
        return False
    for r in mains:
        path = _pareto_plot(r, out)
        images.append(path)
        doc.add(Image(path, f"Cost vs score, {r.column}",
                      f"{r.column}: mean cost (USD per episode) and mean score of each method; grey squares: "
                      "static assignments; lines: the routers' threshold / cost-penalty sweeps; dashed: the "
                      "Pareto frontier."))
    return True


def _find_regime(tr: Sequence[Run], task: str, setting: str, ab: tuple[float, float]) -> Run | None:
    return next((r for r in tr if (r.task, r.setting) == (task, setting) and r.tradeoff() == ab), None)


def _tradeoff_table(task: str, setting: str, regimes, reg_runs: Sequence[Run | None]) -> Table:
    present = [r for r in reg_runs if r is not None]
    names: list[str] = []
    for r in present:
        for n in r.methods:
            if n != "oracle" and n not in names:
                names.append(n)
    statics = [n for n in names if n.startswith("static:")]
    others = [n for n in names if not n.startswith("static:") and not n.startswith("haps")]
    hapses = [n for n in names if n.startswith("haps")]
    order = statics + others + hapses
    header = ["method"]
    for a, b in regimes:
        tag = f"α={a:g}, β={b:g}"
        header += [f"{tag}: Perf ↑", "Cost ↓", "Reward ↑"]
    body = [[Cell(_static_name(present, n))] for n in order]
    for r in reg_runs:
        for k, (key, higher) in enumerate((("score", True), ("cost_norm", False), ("reward", True))):
            col, vals = [], []
            for n in order:
                m = r.methods.get(n) if r else None
                if r is None:
                    col.append(Cell(NOT_RUN if k == 0 else "", NA))
                    vals.append(None)
                    continue
                v = (m.get(key) or {}).get("mean") if m and isinstance(m.get(key), dict) else (m.get(key) if m else None)
                col.append(Cell(f"{v:.3f}") if v is not None else Cell("—", NA))
                vals.append(v)
            _mark(col, vals, higher=higher)
            for row, c in zip(body, col, strict=True):
                row.append(c)
    rows: list[list[Cell] | str] = []
    for i, row in enumerate(body):
        n = order[i]
        if n == (statics[0] if statics else None):
            rows.append("Static")
        if others and n == others[0]:
            rows.append("Baselines")
        rows.append(row)
    col = present[0].column if present else f"{task} / {setting}"
    norm = present[0].summary["reward"].get("cost_normalizer") if present else None
    note = ("Perf: mean score (fraction); Cost: mean min-max normalised cost (normaliser fitted on the train "
            f"split{': ' + _norm_text(norm) if norm else ''}); Reward = α Perf - β Cost. Bold / dark: best of the "
            "column (lowest cost); italic / light: second best. Regimes: " + ", ".join(
                f"{REGIME_NAMES.get(ab, 'custom')} (α={ab[0]:g}, β={ab[1]:g})" for ab in regimes) + ".")
    return Table(f"Trade-off results, {col}", header, rows, note)


def _norm_text(norm: Mapping[str, float]) -> str:
    return f"c_min = {norm['c_min']:.3g}, c_max = {norm['c_max']:.3g} USD"


def _static_name(runs: Sequence[Run], name: str) -> str:
    if not runs:
        return name
    s = runs[0].summary
    label = _label(runs, name)
    if name == f"static:{s.get('weak', {}).get('key')}":
        return f"All Weak ({label})" if len(s.get("roles", [])) > 1 else label
    if name == f"static:{s.get('strong', {}).get('key')}":
        return f"All Strong ({label})" if len(s.get("roles", [])) > 1 else label
    return label


def _pareto_plot(run: Run, out: Path) -> Path:
    pts, curves = [], {}
    for n, m in run.methods.items():
        if not m.get("score") or m.get("cost") is None:
            continue
        kind = "static" if n.startswith("static:") else "haps" if n.startswith("haps") else (
            "oracle" if n == "oracle" else "router")
        pts.append((m["label"], m["cost"], m["score"]["mean"], kind))
        if m.get("curve"):
            curves[m["label"]] = [(p["cost"], p["score"]) for p in m["curve"]]
    front = plots.pareto_frontier([(c, s) for lab, c, s, k in pts if k != "oracle"])
    return plots.pareto(out / f"pareto_{_slug(run.task)}_{_slug(run.setting)}.png", pts, curves, front,
                        xlabel="mean cost per episode (USD)", title=f"Cost vs score: {run.column}")


# ------------------------------------------------------------------------------------------ Fig. 5
def mixed_section(doc: Document, runs: Sequence[Run], out: Path, images: list) -> bool:
    doc.add(Heading("Mixed open / closed pool (Fig. 5)", anchor="mixed"))
    mains = [r for r in runs if r.variant == MAIN and r.mixed]
    if not mains:
        doc.add(Para(f"{NOT_RUN}: no main run of a pool with a closed (API) model (RESULTS/<task>/<setting>/"
                     "summary.json of a mixed pool)."))
        return False
    names = _main_methods(mains)
    rows = [(_label(mains, n), _method(n)) for n in names]
    closed = "; ".join(f"{r.column}: closed = " + ", ".join(m["name"] for m in r.summary["pool"]["models"]
                                                            if not m["open_weights"] or m["backend"] == "api")
                       for r in mains)
    doc.add(_ranked_table("Routers on a mixed pool", mains, rows, ref_rows=[("oracle (upper bound)", _method("oracle"))],
                          note=SCORE_NOTE + f" Closed models take no adapters ({closed})."))
    path = plots.grouped_bars(out / "fig5_mixed.png", [r.column for r in mains],
                              {_label(mains, n): [r.score(n) for r in mains] for n in names},
                              ylabel="score (%)", title="Mixed open / closed pool (Fig. 5)")
    images.append(path)
    doc.add(Image(path, "Fig. 5: routers on a mixed open/closed pool", "Bars: mean score; whiskers: 95% bootstrap "
                  "interval."))
    return True


# ------------------------------------------------------------------------------------------ details
def metrics_section(doc: Document, runs: Sequence[Run]) -> None:
    doc.add(Heading("Router metrics per setting", anchor="metrics"))
    for r in runs:
        if r.variant != MAIN:
            continue
        has_haps = "haps" in r.methods
        header = ["method", "score", "Δ best static", *(["Δ HAPS"] if has_haps else []), "cost (USD)", "PGR", "APGR",
                  "CPT(50%)", "AIQ", "oracle gap", "failed", "selection"]
        rows = []
        for m in r.methods.values():
            sel = "; ".join(f"{k} {v:.0%}" for k, v in sorted(m["selection_labels"].items(), key=lambda kv: -kv[1]))
            rows.append([Cell(m["label"]), _pct_cell(m.get("score")), _diff_cell(m.get("vs_best_static")),
                         *([_diff_cell(m.get("vs_haps"))] if has_haps else []),
                         Cell(_g(m.get("cost"), ".3g")), Cell(_g(m.get("pgr"))), Cell(_g(m.get("apgr"))),
                         Cell(_g(m.get("cpt50"))), Cell(_g(m.get("aiq"), ".3f")),
                         Cell(_g((m.get("oracle_gap") or {}).get("score"), ".3f")),
                         Cell(str(m["failed"] + m["missing"])), Cell(sel or "-")])
        s = r.summary
        note = (f"{s['test_problems']} test problems ({s['test_source']}); reward {s['reward']['kind']}; best static "
                f"(chosen on {s['best_static']['split']}): {s['best_static']['label']}; weak / strong (train cost): "
                f"{s['weak']['label']} / {s['strong']['label']}. Δ: paired bootstrap mean difference of score in "
                "points, [95% interval]. PGR / APGR / CPT(50%): RouteLLM's, on score against weak / strong; AIQ: "
                "RouterBench's, over the router's sweep; '-': undefined (no sweep, or a single point). "
                + (s.get("legend") or ""))
        doc.add(Table(f"{r.column}", header, rows, note))


def _diff_cell(d: Mapping[str, Any] | None) -> Cell:
    if not d:
        return Cell("-", NA)
    x = d["score"]
    return Cell(f"{100 * x['diff']:+.1f}", sub=f"[{100 * x['low']:+.1f}, {100 * x['high']:+.1f}]")


def _g(x: float | None, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def runs_section(doc: Document, runs: Sequence[Run], root: Path) -> None:
    doc.add(Heading("Runs", anchor="runs"))
    rows = []
    for r in runs:
        s = r.summary
        src = {k for m in r.methods.values() for k in m.get("sources", {})}
        rows.append([Cell(str(r.path.parent.relative_to(root))), Cell(s.get("task", r.task)), Cell(r.variant),
                     Cell(s["reward"]["kind"] + (f" {s['reward']['alpha']:g}/{s['reward']['beta']:g}"
                                                 if s["reward"]["kind"] == "tradeoff" else "")),
                     Cell(str(s.get("test_problems"))), Cell(" + ".join(sorted(src)) or "-"),
                     Cell(str(s.get("episodes_played", 0))), Cell(f"{s.get('wall_s', 0):.1f}")])
    doc.add(Table("haps eval runs found", ["folder", "task", "variant", "reward", "test problems", "scored by",
                                           "episodes played", "wall s"], rows,
                  "Layout: RESULTS/<task>/<setting>/summary.json (main) and RESULTS/<task>/<setting>/<variant>/"
                  "summary.json (tradeoff-<a>-<b>, no-sharing, no-lora, depth-<k>)."))


def _slug(s: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in s)
