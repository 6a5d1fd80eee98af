"""Reports from recorded results: summary.json, junit.xml, report.html, the console.

Reports never talk to QEMU or the guest: everything is rendered from ``IterationResult``
values and timeline files, so a run directory can be re-reported without the lab::

    summary = write_summary(run_dir, run_info, results)    # summary.json
    write_junit(run_dir, summary)                          # junit.xml
    write_report(run_dir, summary)                         # report.html (reads timelines)
    print_summary(summary)                                 # final table on the console
    sys.exit(summary.exit_code)
"""

from lab.report.console import RunConsole, print_summary, summary_tables
from lab.report.html import (Timeline, choose_iterations, layout_timeline, read_timeline,
                             render_report, write_report)
from lab.report.junit import build_junit, write_junit
from lab.report.summary import (GroupStats, RunInfo, SignatureStats, Summary, build_summary,
                                exit_code, fmt_rate, load_summary, overall_status,
                                write_summary)

__all__ = [
    "GroupStats", "RunConsole", "RunInfo", "SignatureStats", "Summary", "Timeline",
    "build_junit", "build_summary", "choose_iterations", "exit_code", "fmt_rate",
    "layout_timeline", "load_summary", "overall_status", "print_summary", "read_timeline",
    "render_report", "summary_tables", "write_junit", "write_report", "write_summary",
]
