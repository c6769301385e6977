"""Figures, dashboards and live widgets: pure figure functions, widgets that hold no maths."""
