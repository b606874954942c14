"""Reading finished and running runs, and what is shown of them: the sweep report, the results page
(``docs/results.md``), a run's end-of-run learning curves and the notebook.

- ``runs``: run folders and sweeps as ``RunResult`` (through ``detlab.run_record``);
- ``tables``: the report's rows, CSV and Markdown, the results page's tables and generated blocks;
- ``figures``: the Figure-5 grid, the learning-curve panel and the figures built on it, AP against the
  box weight;
- ``sweep_report``: ``write_report`` (its command: ``detlab report``, in ``detlab.cli.report``).

    runs = load_sweep("multirun/2024-05-01/12-00-00")
    write_report("multirun/2024-05-01/12-00-00")  # report.md, report.csv, report.png
"""

from detlab.analysis.figures import (
    STATUS_COLORS,
    draw_loss_panel,
    learning_curves_png,
    plot_ap_against_box_weight,
    plot_learning_curves,
    plot_stage_run,
    plot_sweep_grid,
    save_png,
    smooth,
)
from detlab.analysis.runs import (
    RunResult,
    by_box_weight,
    entry_config_path,
    find_run_dirs,
    load_run,
    load_runs,
    load_sweep,
    remedy_label,
    run_command,
    step_series,
    sweep_command,
)
from detlab.analysis.sweep_report import write_report
from detlab.analysis.tables import (
    CSV_COLUMNS,
    STEP_LEVEL_DETECTORS,
    TABLE_COLUMNS,
    block_names,
    page_blocks,
    compact_findings,
    count_statuses,
    findings_list,
    findings_table,
    format_counts,
    markdown_table,
    print_summary_counts,
    remedy_table,
    repair_table,
    replace_blocks,
    report_csv,
    report_markdown,
    report_table,
    status_text,
    sweep_table,
    wall_times_table,
)

__all__ = [
    "CSV_COLUMNS", "STATUS_COLORS", "STEP_LEVEL_DETECTORS", "TABLE_COLUMNS", "RunResult",
    "block_names", "page_blocks", "by_box_weight", "compact_findings", "count_statuses", "draw_loss_panel", "entry_config_path",
    "find_run_dirs", "findings_list", "findings_table", "format_counts", "learning_curves_png", "load_run", "load_runs", "load_sweep",
    "markdown_table", "plot_ap_against_box_weight", "plot_learning_curves", "plot_stage_run", "plot_sweep_grid",
    "print_summary_counts", "remedy_label", "remedy_table", "repair_table", "replace_blocks", "report_csv", "report_markdown",
    "report_table", "run_command", "save_png", "smooth", "status_text", "step_series", "sweep_command",
    "sweep_table", "wall_times_table", "write_report",
]
