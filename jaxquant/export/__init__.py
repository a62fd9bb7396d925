"""Export: ModelOpt unified HF checkpoints (``export_hf``), orbax (``save_orbax``/``restore_orbax``),
loading ModelOpt-format quantized checkpoints back (``load_quantized``), and validating them
(``validate_checkpoint``, implemented in ``jaxquant.check``).

Layout, dtypes and JSON files: docs/export.md.
"""

from jaxquant.check import Report, validate_checkpoint
from jaxquant.export.early import EarlyExport
from jaxquant.export.hf import ExportSummary, check_exportable, export_hf
from jaxquant.export.load_quantized import QuantizedLinear, is_quantized_checkpoint, load_quantized
from jaxquant.export.orbax import OrbaxCheckpoint, restore_orbax, save_orbax

__all__ = [
    "EarlyExport",
    "ExportSummary",
    "OrbaxCheckpoint",
    "QuantizedLinear",
    "Report",
    "check_exportable",
    "export_hf",
    "is_quantized_checkpoint",
    "load_quantized",
    "restore_orbax",
    "save_orbax",
    "validate_checkpoint",
]
