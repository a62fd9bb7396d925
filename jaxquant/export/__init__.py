"""Export: ModelOpt unified HF checkpoints (``export_hf``), orbax (``save_orbax``/``restore_orbax``),
and loading ModelOpt-format quantized checkpoints back (``load_quantized``).

Layout, dtypes and JSON files: docs/export.md.
"""

from jaxquant.export.hf import ExportSummary, check_exportable, export_hf

__all__ = ["ExportSummary", "check_exportable", "export_hf"]
