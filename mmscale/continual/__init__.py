"""Continual learning: metrics over the accuracy matrix R[i][j] (task j after training task i), see `metrics`."""

from mmscale.continual.metrics import (
    as_accuracy_matrix,
    average_accuracy,
    average_accuracy_curve,
    average_forgetting,
    backward_transfer,
    forgetting_per_task,
    format_table,
    forward_transfer,
    plot_heatmap,
    summarize,
)

__all__ = [
    "as_accuracy_matrix",
    "average_accuracy",
    "average_accuracy_curve",
    "average_forgetting",
    "backward_transfer",
    "forgetting_per_task",
    "format_table",
    "forward_transfer",
    "plot_heatmap",
    "summarize",
]
