"""EAGLE-3 export: a Llama-style target with an EAGLE-3 draft head, int4 weights, one .pte.

Run ``python -m et_int4.export.export_eagle --help``.
"""
