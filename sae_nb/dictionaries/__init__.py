"""The dictionary classes and their one contract, our format, every other format, the catalogue
(notebook 03)."""
