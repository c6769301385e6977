"""Executable rules, language-model explanations, their scores, tables and search by meaning
(notebook 08)."""
