"""Pictures of simulators: static PNG plots for the command line and a self-contained HTML report.

:func:`write_report` writes the HTML report (:mod:`simfluence.report.page`); its contents
are computed by :func:`build_report_data` (:mod:`simfluence.report.data`).
"""

from simfluence.report.data import ReportData, build_report_data, influence_matrix
from simfluence.report.page import render_report, write_report

__all__ = ["ReportData", "build_report_data", "influence_matrix", "render_report", "write_report"]
