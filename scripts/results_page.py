#!/usr/bin/env python
"""Regenerate the figures and tables of docs/results.md from the experiment's run folders.

    python scripts/results_page.py --recipe multirun/wider_recipe --paper multirun/wider_paper \\
        --remedies multirun/wider_remedies --repairs multirun/wider_repair --stages outputs/wider_overfit

Each option takes sweep folders (every run folder under them) or run folders. The figures go to
``--figures`` (default docs/results/); the tables replace the ``<!-- results:NAME -->`` blocks of
``--page`` (default docs/results.md), the text around them stays. A part whose option is left out
keeps what the page had. ``--page -`` prints the tables instead of writing the page.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from detlab.analysis import (
    block_names,
    page_blocks,
    findings_list,
    format_counts,
    load_runs,
    plot_ap_against_box_weight,
    plot_stage_run,
    plot_sweep_grid,
    remedy_label,
    remedy_table,
    repair_table,
    replace_blocks,
    run_command,
    save_png,
    sweep_command,
    sweep_table,
    wall_times_table,
)
from detlab.errors import UserError, report_user_errors
from detlab.runtime.fileio import atomic_write_text


def _command(paths: list[Path], runs: list) -> str | None:
    commands = [c for c in (sweep_command(p) for p in paths) if c]
    if commands:
        return " ; ".join(commands)
    return run_command(runs[0]) if len(runs) == 1 else None


def merge_rows(old: str, new: str) -> str:
    """The Markdown table ``new`` with the rows of ``old`` whose first cell ``new`` lacks, in ``old``'s
    order (a group measured again replaces its row, in its place; a new group is added at the end)."""
    old_rows = [line for line in old.strip().splitlines()[2:] if line.startswith("|")]
    lines = new.strip().splitlines()
    header, fresh = lines[:2], {_first_cell(line): line for line in lines[2:]}
    rows = [fresh.pop(_first_cell(line), line) for line in old_rows]
    return "\n".join([*header, *rows, *fresh.values()])


def _first_cell(row: str) -> str:
    return row.strip("|").split("|")[0].strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, nargs="+", default=[], help="the sweep under +preset=wider_cpu")
    parser.add_argument("--paper", type=Path, nargs="+", default=[], help="the sweep under +preset=[wider_cpu,paper]")
    parser.add_argument("--remedies", type=Path, nargs="+", default=[], help="the remedy runs (+remedy=...)")
    parser.add_argument("--repairs", type=Path, nargs="+", default=[],
                        help="the paper's failing pairs trained with diagnosis.repair=true")
    parser.add_argument("--stages", type=Path, nargs="+", default=[], help="the run that shows the mid/late stages")
    parser.add_argument("--page", default="docs/results.md", help="the page whose blocks are replaced; - prints")
    parser.add_argument("--figures", type=Path, default=Path("docs/results"), help="where the PNGs go")
    args = parser.parse_args(argv)

    blocks: dict[str, str] = {}
    walls: list[tuple[str, list, str | None]] = []
    sweeps = []
    for name, label, paths in (("recipe", "+preset=wider_cpu (AdamW)", args.recipe),
                               ("paper", "+preset=[wider_cpu,paper] (SGD)", args.paper)):
        if not paths:
            continue
        runs = load_runs(paths)
        if not runs:
            raise UserError(f"--{name}: no run folders under {', '.join(map(str, paths))}")
        sweeps.append((label, runs))
        blocks[f"{name}_table"] = f"**{format_counts(runs)}**\n\n{sweep_table(runs)}"
        save_png(plot_sweep_grid(runs, title=f"{label}: {format_counts(runs)}", per_step=True),
                 args.figures / f"{name}_grid.png")
        walls.append((f"{name} sweep", runs, _command(paths, runs)))
    if sweeps:
        save_png(plot_ap_against_box_weight(sweeps), args.figures / "ap_against_box_weight.png")
    if args.remedies:
        runs = load_runs(args.remedies)
        blocks["remedy_table"] = remedy_table(runs)
        # the baseline is another sweep's run: its time is in that sweep's row
        walls.append(("remedies", [r for r in runs if remedy_label(r) != "none"], _command(args.remedies, runs)))
    if args.repairs:
        runs = load_runs(args.repairs)
        blocks["repair_table"] = repair_table(runs)
        walls.append(("repairs", runs, _command(args.repairs, runs)))
    if args.stages:
        for index, run in enumerate(load_runs(args.stages)):
            save_png(plot_stage_run(run, title=f"{run.path.name}: {run.status}, {run.epochs} epochs"),
                     args.figures / f"stages_{index}.png")
            blocks[f"stages_{index}"] = (f"`{run_command(run)}`: {run.status}, {run.epochs} epochs\n\n"
                                         f"{findings_list(run)}")
            walls.append((f"stages run {index}", [run], run_command(run)))
    if walls:
        blocks["wall_times"] = wall_times_table(walls)
    page = None if args.page == "-" else Path(args.page)
    if "wall_times" in blocks and page is not None and page.is_file():
        # the groups whose option was left out keep their rows, as their other blocks do
        blocks["wall_times"] = merge_rows(page_blocks(page.read_text()).get("wall_times", ""), blocks["wall_times"])

    if args.page == "-":
        for name, body in blocks.items():
            print(f"<!-- results:{name} -->\n{body}\n<!-- /results:{name} -->\n")
        return 0
    if not page.is_file():
        raise UserError(f"--page {page}: not found (the page holds the <!-- results:NAME --> blocks to fill)")
    text, untouched = replace_blocks(page.read_text(), blocks)
    missing = sorted(set(blocks) - set(block_names(page.read_text())))
    atomic_write_text(page, text)
    print(f"written {page} ({len(blocks) - len(missing)} blocks) and figures under {args.figures}")
    if untouched:
        print(f"kept as they were (no option given): {', '.join(untouched)}")
    if missing:
        print(f"warning: the page has no block for {', '.join(missing)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    with report_user_errors():  # a bad argument or folder: one line, exit 2
        sys.exit(main())
