"""`haps collect`, `haps warmup`, `haps sft`, `haps eval-lookup`, `haps route`: routing data and the
high-level router."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from haps.cli import app


def _options(items: list[str]) -> dict:
    import yaml

    from haps.errors import ConfigError

    out = {}
    for it in items:
        if "=" not in it:
            raise ConfigError(f"workflow option {it!r} must be key=value (e.g. budget=2).")
        k, v = it.split("=", 1)
        out[k] = yaml.safe_load(v)
    return out


@app.command("collect")
def collect_cmd(
    task: str = typer.Option(..., help="Workflow / benchmark: hotpotqa | mmlu."),
    out: Path = typer.Option(..., help="Output folder (actions.jsonl, manifest.json, episodes/)."),
    data: str = typer.Option(None, help="Problems JSONL file or folder (default: the embedded demo set)."),
    limit: int = typer.Option(None, help="First N problems of the file."),
    pool: str = typer.Option("tiny", help="Built-in pool name or pool YAML."),
    config: Path = typer.Option(None, help="YAML with CollectConfig fields (command-line values win)."),
    max_new_tokens: int = typer.Option(None, help="Tokens per model call (default: the runner's 256)."),
    sample: int = typer.Option(None, help="L assignments sampled per problem when K^N > --max-enumerate."),
    max_enumerate: int = typer.Option(None, help="Enumerate all assignments up to this many (default 64)."),
    seed: int = typer.Option(None, help="Seed (assignment sampling, agent sampling)."),
    chunk_size: int = typer.Option(None, help="Problems per lockstep runner call (default 8)."),
    option: list[str] = typer.Option([], "--option", "-o", help="Workflow option key=value (repeatable)."),
    progress: bool = typer.Option(True, help="Show the progress bar."),
) -> None:
    """Run every assignment for every problem and record r(p, z) (resumable: rerun the same command)."""
    from haps.config import load_yaml
    from haps.train.collect import CollectConfig, collect

    base = dict(load_yaml(config)) if config else {}
    given = {"task": task, "data": data, "limit": limit, "pool": pool, "max_new_tokens": max_new_tokens,
             "sample": sample, "max_enumerate": max_enumerate, "seed": seed, "chunk_size": chunk_size}
    base.update({k: v for k, v in given.items() if v is not None})
    for k in ("data", "limit", "max_new_tokens", "chunk_size"):  # a config may give per-task values
        if isinstance(base.get(k), dict):
            base[k] = base[k].get(task)
    wo = base.get("workflow_options")
    if isinstance(wo, dict) and wo and all(isinstance(v, dict) for v in wo.values()):  # keyed by task
        base["workflow_options"] = wo.get(task, {})
    if option:
        base["workflow_options"] = {**base.get("workflow_options", {}), **_options(option)}
    base.pop("notes", None)
    if base.get("data") and not Path(base["data"]).exists():  # relative to $HAPS_DATA
        import os

        root = os.environ.get("HAPS_DATA")
        if root and (Path(root) / base["data"]).exists():
            base["data"] = str(Path(root) / base["data"])
    cfg = CollectConfig.model_validate(base)
    s = collect(cfg, out, progress=progress)
    Console().print(f"[bold]{s.out}[/]: {s.total} (problem, assignment) pairs, {s.done_before} already done, "
                    f"{s.written} written in {s.seconds:.1f}s ({s.episodes_per_s:.3f} episodes/s)"
                    + (f"; repaired a torn last line ({s.repaired_bytes} bytes)" if s.repaired_bytes else ""))


@app.command("warmup")
def warmup_cmd(
    actions: Path = typer.Option(..., help="Action-level data folder."),
    split: str = typer.Option("train", help="Split."),
    tie: str = typer.Option("random", help="all | random | first."),
    drop_all_zero: bool = typer.Option(False, help="Drop problems no assignment solved."),
    balance: str = typer.Option("none", help="none | undersample | oversample."),
    seed: int = typer.Option(0),
    json_out: Path = typer.Option(None, "--json", help="Write the statistics here."),
) -> None:
    """Statistics of the warm-up set (best assignment per training problem)."""
    import json

    from haps.train.collect import read_actions
    from haps.train.warmup import build_warmup

    _, stats = build_warmup(read_actions(actions), split=split, tie=tie, drop_all_zero=drop_all_zero,  # type: ignore[arg-type]
                            balance=balance, seed=seed)  # type: ignore[arg-type]
    Console().print(stats.table())
    if json_out:
        json_out.write_text(json.dumps(stats.to_dict(), indent=2) + "\n")


@app.command("sft")
def sft_cmd(
    actions: Path = typer.Option(..., help="Action-level data folder (from `haps collect`)."),
    out: Path = typer.Option(..., help="Checkpoint folder (best epoch by validation reward)."),
    epochs: int = typer.Option(3),
    lr: float = typer.Option(2e-5, help="Peak learning rate."),
    batch_size: int = typer.Option(4),
    grad_accum: int = typer.Option(1),
    warmup_ratio: float = typer.Option(0.1),
    lora: bool = typer.Option(False, help="Train a PEFT LoRA on the backbone instead of all weights."),
    lora_r: int = typer.Option(8),
    backbone: str = typer.Option("smollm2-135m", help="Pool model name or HF hub id / folder."),
    backbone_pool: str = typer.Option("tiny", help="Pool that --backbone names."),
    tie: str = typer.Option("random", help="Warm-up tie policy: all | random | first."),
    drop_all_zero: bool = typer.Option(False),
    balance: str = typer.Option("none", help="none | undersample | oversample."),
    valid_limit: int = typer.Option(None, help="Validate on the first N validation problems."),
    seed: int = typer.Option(0),
    progress: bool = typer.Option(True),
) -> None:
    """Supervised warm-up of the high-level router (paper Phase 1)."""
    from haps.routing.high_level import HighLevelRouterConfig, RouterLoraConfig
    from haps.train.sft import SFTConfig, run_sft

    rcfg = HighLevelRouterConfig(backbone=backbone, backbone_pool=backbone_pool,
                                 lora=RouterLoraConfig(r=lora_r) if lora else None, seed=seed)
    cfg = SFTConfig(epochs=epochs, lr=lr, batch_size=batch_size, grad_accum=grad_accum, warmup_ratio=warmup_ratio,
                    tie=tie, drop_all_zero=drop_all_zero, balance=balance, valid_limit=valid_limit, seed=seed,
                    router=rcfg)
    rec = run_sft(actions, out, cfg, progress=progress)
    Console().print(f"best epoch {rec.best['epoch'] if rec.best else '-'}: {rec.best}; checkpoint at {out}")


@app.command("eval-lookup")
def eval_lookup_cmd(
    actions: Path = typer.Option(..., help="Action-level data folder."),
    router: list[str] = typer.Option(["all"], help="CKPT | fixed:<role>=<model>,... | random | oracle | all "
                                     "(repeatable; `all` = oracle, random and every fixed assignment)."),
    split: str = typer.Option("test", help="Split to evaluate on (train | valid | test | all)."),
    reward_kind: str = typer.Option(None, help="Recompute rewards: score | shaped | tradeoff."),
    alpha: float = typer.Option(1.0),
    beta: float = typer.Option(0.0),
    json_out: Path = typer.Option(None, "--json", help="Write the report here."),
) -> None:
    """Evaluation by lookup: each policy's mean reward, score and cost read from r(p, z)."""
    from haps.evaluate import (
        ActionTable,
        lookup_report,
        parse_policy_spec,
        recompute_rewards,
        report_table,
        router_policies,
        standard_policies,
        write_report,
    )
    from haps.train.collect import open_collection

    col = open_collection(actions)
    recs = col.records
    if reward_kind:
        from haps.metrics import RewardConfig

        recs = recompute_rewards(recs, RewardConfig(kind=reward_kind, alpha=alpha, beta=beta))
    table = ActionTable.from_records(recs, col.space, None if split == "all" else split)
    std = standard_policies(table)
    pols = {}
    for spec in router:
        kind, arg = parse_policy_spec(spec)
        if kind == "all":
            pols.update(std)
        elif kind in ("oracle", "random"):
            pols[kind] = std[kind]
        elif kind == "fixed":
            z = col.space.from_key(arg) if "=" in arg else tuple(int(v) for v in arg.split(","))
            pols[f"fixed:{col.space.key(z)}"] = table.fixed(z)
        else:
            from haps.routing.high_level import load_router
            from haps.routing.prompt import build_routing_prompt

            r = load_router(arg)
            wf, pc = col.workflow(), col.pool_config()
            probs = {p.id: p for p in col.problems()}
            prompts = [build_routing_prompt(wf, pc, probs[pid]) for pid in table.problem_ids]
            pols.update(router_policies(r, table, prompts, name=f"router:{Path(arg).name}"))
    rep = lookup_report(table, pols)
    rep["split"] = split
    Console().print(report_table(rep, f"evaluation by lookup, split {split}"))
    if json_out:
        write_report(rep, json_out)


@app.command("route")
def route_cmd(
    task: str = typer.Option(..., help="hotpotqa | mmlu."),
    problem_id: str = typer.Option(None, help="Problem id."),
    index: int = typer.Option(None, help="Problem index in the file."),
    data: str = typer.Option(None, help="Problems file (default: embedded demo set)."),
    router: str = typer.Option("random", help="CKPT | fixed:... | random."),
    pool: str = typer.Option("tiny", help="Pool (its names and descriptions make the candidate list)."),
    option: list[str] = typer.Option([], "--option", "-o", help="Workflow option key=value."),
) -> None:
    """Print the routing prompt, P(z|p) over assignments and the choice."""
    from rich.table import Table

    from haps.config import load_pool
    from haps.data import load_problems
    from haps.errors import ConfigError
    from haps.routing.base import get_router
    from haps.routing.prompt import build_routing_prompt, space_for
    from haps.workflows.base import get_workflow

    if (problem_id is None) == (index is None):
        raise ConfigError("give exactly one of --problem-id or --index.")
    problems = load_problems(task, data)
    if index is not None:
        if not 0 <= index < len(problems):
            raise ConfigError(f"--index {index} out of range: the file has {len(problems)} problems.")
        prob = problems[index]
    else:
        found = [p for p in problems if p.id == problem_id]
        if not found:
            raise ConfigError(f"no problem with id {problem_id!r} in {data or 'the demo set'}.")
        prob = found[0]
    wf = get_workflow(task, **_options(option))
    pc = load_pool(pool)
    space = space_for(wf, pc)
    r = get_router(f"high_level:{router}" if Path(router).is_dir() else router, space=space)
    prompt = build_routing_prompt(wf, pc, prob)
    c = Console()
    c.rule("system")
    c.print(prompt.system, markup=False)
    c.rule("user")
    c.print(prompt.user, markup=False)
    z = r.route([prompt])[0]
    t = Table(title=f"P(z|p) under {router}")
    t.add_column("z")
    t.add_column("assignment")
    t.add_column("P", justify="right")
    if r.enumerable:
        p = r.probs([prompt])[0]
        for j, zz in enumerate(space.assignments()):
            t.add_row(str(list(zz)), space.key(zz) + ("  <- choice" if zz == z else ""), f"{float(p[j]):.4f}")
        c.print(t)
    c.print(f"choice: {list(z)} = {space.to_names(z)}")
