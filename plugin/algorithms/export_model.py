"""``casd:exportonnx`` — a model package as an ONNX model, for installs without PyTorch."""

from __future__ import annotations

from qgis.core import (QgsProcessingOutputFile, QgsProcessingParameterBoolean, QgsProcessingParameterFile,
                       QgsProcessingParameterFileDestination, QgsProcessingParameterNumber)

from ..feedback import monitor_for
from .common import CasdAlgorithm, advanced, user_errors

MODEL = "MODEL"
OUTPUT = "OUTPUT"
HALF = "HALF"
INT8 = "INT8"
SPLIT_CSV = "SPLIT_CSV"
DATA_FOLDER = "DATA_FOLDER"
CALIBRATION_PER_CLASS = "CALIBRATION_PER_CLASS"

# The core's settings whose parameter is not simply the key in upper case (for user_errors).
PARAMETERS = {"data_root": DATA_FOLDER}


class ExportModelAlgorithm(CasdAlgorithm):
    def name(self) -> str:
        return "exportonnx"

    def displayName(self) -> str:  # noqa: N802 (QGIS's name)
        return "Export a scene classifier to ONNX"

    def shortHelpString(self) -> str:  # noqa: N802 (QGIS's name)
        return (
            "Writes a model package (.safetensors) as an ONNX model with a dynamic batch, whose "
            "output is the calibrated class probabilities and whose metadata holds the whole "
            "package description (classes, colours, bands, normalisation, footprint, metrics) "
            "plus Deepness's keys. The classify algorithms run .onnx models in onnxruntime, so "
            "they need no PyTorch there.<br><br>"
            "<i>Half</i> stores the weights as float16 (half the file, computed in float32). "
            "<i>int8</i> quantizes the network, calibrated on the <i>train</i> rows of a split CSV: "
            "faster on CPU, slightly less accurate (see docs/BENCHMARKS.md). Needs PyTorch."
        )

    def initAlgorithm(self, config=None) -> None:  # noqa: N802 (QGIS's name)
        from casd_core.onnx.quantize import CalibrationConfig

        self.add_model_parameter(MODEL)
        self.addParameter(QgsProcessingParameterFileDestination(OUTPUT, "ONNX model", "ONNX models (*.onnx)"))
        self.addParameter(QgsProcessingParameterBoolean(HALF, "Half: store the weights as float16",
                                                        defaultValue=False))
        self.addParameter(QgsProcessingParameterBoolean(INT8, "int8: quantize (needs a split CSV)",
                                                        defaultValue=False))
        self.addParameter(QgsProcessingParameterFile(
            SPLIT_CSV, "Split CSV whose train rows calibrate int8 (path,label,split)",
            behavior=QgsProcessingParameterFile.Behavior.File, extension="csv", optional=True))
        self.addParameter(advanced(QgsProcessingParameterFile(
            DATA_FOLDER, "Image folder (the CSV paths are relative to it; empty: the CSV's folder)",
            behavior=QgsProcessingParameterFile.Behavior.Folder, optional=True)))
        self.addParameter(advanced(QgsProcessingParameterNumber(
            CALIBRATION_PER_CLASS, "Calibration images per class", type=QgsProcessingParameterNumber.Type.Integer,
            defaultValue=CalibrationConfig.calibration_per_class, minValue=1)))
        self.addOutput(QgsProcessingOutputFile(OUTPUT, "ONNX model"))

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802 (QGIS's name)
        with user_errors(self, PARAMETERS):
            from casd_core.errors import CasdError, param
            from casd_core.onnx.export import export_onnx
            from casd_core.onnx.quantize import CalibrationConfig

            output = self.parameterAsFileOutput(parameters, OUTPUT, context)
            half = self.parameterAsBool(parameters, HALF, context)
            int8 = self.parameterAsBool(parameters, INT8, context)
            split_csv = self.parameterAsFile(parameters, SPLIT_CSV, context)
            if half and int8:
                raise CasdError(f"choose one of {param('half')} and {param('int8')}")
            calibration = None
            if int8 and split_csv:
                calibration = CalibrationConfig(split_csv, self.parameterAsFile(parameters, DATA_FOLDER, context) or None,
                                                self.parameterAsInt(parameters, CALIBRATION_PER_CLASS, context))
            model = self.model_path(parameters, MODEL, context)
            feedback.pushInfo(f"Exporting {model}")
            path = export_onnx(model, output, half=half, int8=int8, calibration=calibration,
                               monitor=monitor_for(feedback))
            feedback.pushInfo(f"Wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
        return {OUTPUT: str(path)}
