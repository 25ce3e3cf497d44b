"""``casd:evaluate`` — accuracy of a model package on one split of a split CSV."""

from __future__ import annotations

from pathlib import Path

from qgis.core import (QgsProcessingOutputFile, QgsProcessingOutputNumber, QgsProcessingParameterFile,
                       QgsProcessingParameterFolderDestination, QgsProcessingParameterNumber,
                       QgsProcessingParameterString)

from ..feedback import monitor_for
from .common import CasdAlgorithm, advanced, use_python_for_child_processes, user_errors

MODEL = "MODEL"
DATA_FOLDER = "DATA_FOLDER"
SPLIT_CSV = "SPLIT_CSV"
SPLIT = "SPLIT"
BATCH_SIZE = "BATCH_SIZE"
DEVICE = "DEVICE"
OUTPUT_FOLDER = "OUTPUT_FOLDER"
OVERALL_ACCURACY = "OVERALL_ACCURACY"
KAPPA = "KAPPA"
MACRO_F1 = "MACRO_F1"
METRICS_JSON = "METRICS_JSON"
CONFUSION_PNG = "CONFUSION_PNG"

# The core's settings whose parameter is not simply the key in upper case (for user_errors).
PARAMETERS = {"data_root": DATA_FOLDER, "out_dir": OUTPUT_FOLDER}


class EvaluateAlgorithm(CasdAlgorithm):
    def name(self) -> str:
        return "evaluate"

    def displayName(self) -> str:  # noqa: N802 (QGIS's name)
        return "Evaluate a scene classifier"

    def shortHelpString(self) -> str:  # noqa: N802 (QGIS's name)
        return (
            "Runs a model package over the images of one split of a split CSV (columns "
            "<i>path,label,split</i>, paths relative to the image folder) and reports the overall "
            "accuracy, Cohen's kappa and per-class precision, recall and F1 in the log.<br><br>"
            "The report folder receives <i>metrics.json</i>, <i>confusion_matrix.csv</i> and "
            "<i>confusion_matrix.png</i>. Images are prepared exactly as during training, so the "
            "test accuracy recorded at training is reproduced. An <i>.onnx</i> export (e.g. int8) "
            "is evaluated in onnxruntime on the very same images. Cancel stops between batches and "
            "writes nothing."
        )

    def initAlgorithm(self, config=None) -> None:  # noqa: N802 (QGIS's name)
        self.add_model_parameter(MODEL)
        self.addParameter(QgsProcessingParameterFile(
            DATA_FOLDER, "Image folder (the CSV paths are relative to it)",
            behavior=QgsProcessingParameterFile.Behavior.Folder))
        self.addParameter(QgsProcessingParameterFile(
            SPLIT_CSV, "Split CSV (path,label,split)", behavior=QgsProcessingParameterFile.Behavior.File,
            extension="csv"))
        self.addParameter(QgsProcessingParameterString(SPLIT, "Split to evaluate", defaultValue="test"))
        self.addParameter(advanced(QgsProcessingParameterNumber(
            BATCH_SIZE, "Batch size", type=QgsProcessingParameterNumber.Type.Integer, defaultValue=64, minValue=1)))
        self.add_device_parameter(DEVICE)
        self.addParameter(QgsProcessingParameterFolderDestination(
            OUTPUT_FOLDER, "Report folder (metrics JSON, confusion matrix CSV and PNG)"))
        self.addOutput(QgsProcessingOutputNumber(OVERALL_ACCURACY, "Overall accuracy"))
        self.addOutput(QgsProcessingOutputNumber(KAPPA, "Cohen's kappa"))
        self.addOutput(QgsProcessingOutputNumber(MACRO_F1, "Macro F1"))
        self.addOutput(QgsProcessingOutputFile(METRICS_JSON, "Metrics JSON"))
        self.addOutput(QgsProcessingOutputFile(CONFUSION_PNG, "Confusion matrix image"))

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802 (QGIS's name)
        out_dir = self.parameterAsString(parameters, OUTPUT_FOLDER, context)
        use_python_for_child_processes()
        with user_errors(self, PARAMETERS):
            from casd_core.evaluate import evaluate_package

            model = self.model_path(parameters, MODEL, context)
            split = self.parameterAsString(parameters, SPLIT, context) or "test"
            feedback.pushInfo(f"Evaluating {model} on the '{split}' rows")
            report = evaluate_package(
                model, self.parameterAsFile(parameters, DATA_FOLDER, context),
                self.parameterAsFile(parameters, SPLIT_CSV, context), split=split, out_dir=out_dir,
                batch_size=self.parameterAsInt(parameters, BATCH_SIZE, context),
                device=self.device(parameters, DEVICE, context), monitor=monitor_for(feedback))
        feedback.pushInfo(f"Overall accuracy: {report['overall_accuracy']:.2%}   kappa: {report['kappa']:.3f}   "
                          f"macro F1: {report['macro_f1']:.3f}   ({report['num_samples']} images)")
        for name, scores in report["per_class"].items():
            if scores["support"]:
                feedback.pushInfo(f"  {name:<20} precision {scores['precision']:.3f}  recall {scores['recall']:.3f}"
                                  f"  F1 {scores['f1']:.3f}  ({scores['support']} images)")
        files = report.get("files", {})
        return {OUTPUT_FOLDER: out_dir, OVERALL_ACCURACY: report["overall_accuracy"], KAPPA: report["kappa"],
                MACRO_F1: report["macro_f1"], METRICS_JSON: files.get("metrics", str(Path(out_dir) / "metrics.json")),
                CONFUSION_PNG: files.get("confusion_png", str(Path(out_dir) / "confusion_matrix.png"))}
