"""HTML report written after training (`RUN/report.html`)."""

from layerwise.report.html import (
    Example,
    ReportData,
    figure_png,
    per_class_metrics,
    png_data_uri,
    render_report,
    write_report,
)

__all__ = [
    "Example",
    "ReportData",
    "figure_png",
    "per_class_metrics",
    "png_data_uri",
    "render_report",
    "write_report",
]
