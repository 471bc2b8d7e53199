"""The dock's result panel: a per-rater table and a confusion-matrix heatmap.

Both are plain ``QTableWidget`` s (no matplotlib): the heatmap colours each cell
``p(rater r says i | truth j)`` from white (0) to dark blue (1) and prints the value.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from qtpy.QtGui import QBrush, QColor
from qtpy.QtWidgets import (
    QAbstractItemView,
    QHeaderView,
    QLabel,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

#: Columns of the rater table: (key in raterseg.metrics.rater_table's dicts, header,
#: tooltip); as the command line's fuse table.
RATER_COLUMNS = (
    ("sensitivity", "sensitivity", ("Share of the truth's foreground (any label > 0) the rater "
                                   "labelled foreground, on the voxels it annotated")),
    ("specificity", "specificity", ("Share of the truth's background (0) the rater labelled "
                                   "background, on the voxels it annotated")),
    ("dice", "Dice", ("Dice with the truth, on the voxels the rater annotated; with more than "
                     "two classes the mean over the labels 1.. present")),
    ("annotated", "annotated", ("Share of the voxels the rater labelled (not -1, "
                               "unannotated); the other columns count only these")),
)

_LOW = np.array([255, 255, 255], float)
_HIGH = np.array([8, 48, 107], float)


def heat_color(value: float) -> tuple[QColor, QColor]:
    """Background (white → dark blue) and a readable text colour for a value in [0, 1]."""
    v = float(np.clip(value, 0.0, 1.0)) if np.isfinite(value) else 0.0
    rgb = (_LOW + (_HIGH - _LOW) * v).round().astype(int)
    text = QColor("white") if v > 0.5 else QColor("black")
    return QColor(*rgb.tolist()), text


def _item(text: str) -> QTableWidgetItem:
    return QTableWidgetItem(text)


def _fmt(value: Any) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    return "–" if not np.isfinite(v) else f"{v:.3f}"


def _fit_height(table: QTableWidget, max_rows: int = 12) -> None:
    """Make a table as tall as its rows (up to ``max_rows``; it scrolls beyond)."""
    rows = min(table.rowCount(), max_rows)
    height = table.horizontalHeader().height() + 2 * table.frameWidth()
    height += sum(table.rowHeight(r) for r in range(rows))
    table.setFixedHeight(height + 2)


class ResultPanel(QWidget):
    """Shows the last result: ``rater_table`` (a QTableWidget, one row per rater) and
    ``confusion_table`` (a QTableWidget heatmap, rows "rater: says i", columns "truth j")."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.title = QLabel("No result yet")
        self.title.setWordWrap(True)
        self.rater_table = QTableWidget(0, len(RATER_COLUMNS))
        self.rater_table.setHorizontalHeaderLabels([h for _, h, _ in RATER_COLUMNS])
        for c, (_, _, tip) in enumerate(RATER_COLUMNS):
            self.rater_table.horizontalHeaderItem(c).setToolTip(tip)
        self.confusion_label = QLabel("Rater confusion p(rater says i | truth j)")
        self.confusion_table = QTableWidget(0, 0)
        for table in (self.rater_table, self.confusion_table):
            table.setEditTriggers(QAbstractItemView.NoEditTriggers)
            table.horizontalHeader().setSectionResizeMode(QHeaderView.Stretch)
            table.horizontalHeader().setMinimumSectionSize(60)
        layout.addWidget(self.title)
        layout.addWidget(self.rater_table)
        layout.addWidget(self.confusion_label)
        layout.addWidget(self.confusion_table)

    def clear(self) -> None:
        self.title.setText("No result yet")
        self.rater_table.setRowCount(0)
        self.confusion_table.setRowCount(0)
        self.confusion_table.setColumnCount(0)

    def show_result(self, title: str, rater_names: Sequence[str], rows: Sequence[dict],
                    rater_confusion: np.ndarray | None, num_classes: int = 2) -> None:
        """Fill both tables.

        Args:
            title: a line above the tables (method and image), followed by what the
                rater table measures (:func:`raterseg.metrics.rater_table_caption`).
            rater_names: one name per rater (the rater layers' names).
            rows: one dict per rater with the keys of :data:`RATER_COLUMNS`.
            rater_confusion: ``(R, L, L)``, ``[r, i, j] = p(rater r says i | truth j)``, or None.
            num_classes: the result's number of classes (what the columns measure).
        """
        from raterseg.metrics import rater_table_caption

        self.title.setText(f"{title}. {rater_table_caption(num_classes)}")
        self.rater_table.setRowCount(len(rows))
        self.rater_table.setVerticalHeaderLabels(list(rater_names))
        for r, row in enumerate(rows):
            for c, (key, _, _) in enumerate(RATER_COLUMNS):
                self.rater_table.setItem(r, c, _item(_fmt(row.get(key, float("nan")))))
        self._show_confusion(rater_names, rater_confusion)
        for table in (self.rater_table, self.confusion_table):
            _fit_height(table)

    def _show_confusion(self, rater_names: Sequence[str], cm: np.ndarray | None) -> None:
        table = self.confusion_table
        if cm is None:
            self.confusion_label.setText("This method does not model rater confusion")
            table.setRowCount(0)
            table.setColumnCount(0)
            return
        self.confusion_label.setText("Rater confusion p(rater says i | truth j)")
        R, L, _ = cm.shape
        table.setColumnCount(L)
        table.setHorizontalHeaderLabels([f"truth {j}" for j in range(L)])
        table.setRowCount(R * L)
        table.setVerticalHeaderLabels([f"{rater_names[r]}: says {i}"
                                       for r in range(R) for i in range(L)])
        for r in range(R):
            for i in range(L):
                for j in range(L):
                    item = _item(_fmt(cm[r, i, j]))  # "–": a rater who annotated nothing
                    bg, fg = heat_color(cm[r, i, j])
                    item.setBackground(QBrush(bg))
                    item.setForeground(QBrush(fg))
                    table.setItem(r * L + i, j, item)
