"""``casd:train`` — train a scene classifier on an image folder and write a model package."""

from __future__ import annotations

from qgis.core import (QgsProcessingOutputFile, QgsProcessingOutputNumber, QgsProcessingParameterBoolean,
                       QgsProcessingParameterFile, QgsProcessingParameterEnum,
                       QgsProcessingParameterFolderDestination, QgsProcessingParameterNumber)

from ..feedback import monitor_for
from .common import MODEL_FILTER, CasdAlgorithm, advanced, use_python_for_child_processes, user_errors

DATA_FOLDER = "DATA_FOLDER"
SPLIT_CSV = "SPLIT_CSV"
METHOD = "METHOD"
BACKBONE = "BACKBONE"
PRETRAINED = "PRETRAINED"
INIT = "INIT"
INIT_DEFAULT = "INIT_DEFAULT"
FREEZE_EPOCHS = "FREEZE_EPOCHS"
EPOCHS = "EPOCHS"
BATCH_SIZE = "BATCH_SIZE"
SUBSET_PER_CLASS = "SUBSET_PER_CLASS"
TILE_FOOTPRINT = "TILE_FOOTPRINT"
SEED = "SEED"
DEVICE = "DEVICE"
OUTPUT_FOLDER = "OUTPUT_FOLDER"
OUTPUT_MODEL = "OUTPUT_MODEL"
VALIDATION_ACCURACY = "VALIDATION_ACCURACY"
TEST_ACCURACY = "TEST_ACCURACY"

# The core's settings whose parameter is not simply the key in upper case (for user_errors).
PARAMETERS = {"data_root": DATA_FOLDER, "out_dir": OUTPUT_FOLDER, "tile_footprint_m": TILE_FOOTPRINT}


class TrainAlgorithm(CasdAlgorithm):
    def name(self) -> str:
        return "train"

    def displayName(self) -> str:  # noqa: N802 (QGIS's name)
        return "Train a scene classifier"

    def shortHelpString(self) -> str:  # noqa: N802 (QGIS's name)
        return (
            "Trains a scene classifier on labelled images and writes a model package "
            "(<i>model.safetensors</i>) that the classify algorithms use.<br><br>"
            "<b>Image folder</b>: one sub-folder per class (e.g. AID). <b>Split CSV</b> (optional): "
            "columns <i>path,label,split</i> with paths relative to the image folder; only its "
            "<i>train</i> rows are trained on (a validation part is carved out of them to pick the "
            "best epoch) and its <i>test</i> rows are evaluated once at the end. Without a CSV every "
            "image is used for training.<br><br>"
            "<b>Method</b>: <i>casd</i> (Class-Aware Self-Distillation: same-class and confusable "
            "other-class partners with a learnable margin), <i>cskd</i> (class-wise self-distillation) "
            "or <i>ce</i> (plain cross-entropy). <b>Tile footprint</b> (optional) is the ground size "
            "in metres of one training image; it becomes the default tile size when classifying rasters "
            "(empty: on a chip folder made by <i>Make training chips</i>, the chips' footprint).<br><br>"
            "<b>Fine-tune</b>: choose a <b>model package to start from</b>, or tick <b>Start from the "
            "embedded model</b>: its trained backbone gets a new head for your classes (far better than "
            "ImageNet weights with a few tens of chips per class). <b>Freeze the backbone for the first "
            "epochs</b> trains only the head then, several times faster.<br><br>"
            "The run folder keeps a checkpoint after each epoch: running again with the same settings "
            "and folder resumes. Cancel stops between batches; no model package is written then. "
            "Training is slow on a CPU: try a few epochs and a small subset per class first."
        )

    def initAlgorithm(self, config=None) -> None:  # noqa: N802 (QGIS's name)
        from casd_core.losses import METHODS
        from casd_core.models import BACKBONES
        from casd_core.finetune import DEFAULT_INIT
        from casd_core.train import TrainConfig  # its field defaults are the dialog's defaults

        self._methods = list(METHODS)
        self._backbones = list(BACKBONES)
        integer, double = QgsProcessingParameterNumber.Type.Integer, QgsProcessingParameterNumber.Type.Double
        self.addParameter(QgsProcessingParameterFile(
            DATA_FOLDER, "Image folder (one sub-folder per class)",
            behavior=QgsProcessingParameterFile.Behavior.Folder))
        self.addParameter(QgsProcessingParameterFile(
            SPLIT_CSV, "Split CSV (path,label,split; empty: train on every image)",
            behavior=QgsProcessingParameterFile.Behavior.File, extension="csv", optional=True))
        self.addParameter(QgsProcessingParameterEnum(
            METHOD, "Method", options=self._methods, defaultValue=self._methods.index(TrainConfig.method)))
        self.addParameter(QgsProcessingParameterEnum(
            BACKBONE, "Backbone (a fine-tune trains its model's)", options=self._backbones,
            defaultValue=self._backbones.index(TrainConfig.backbone)))
        self.addParameter(QgsProcessingParameterBoolean(
            PRETRAINED, "Start from ImageNet weights", defaultValue=TrainConfig.pretrained is not None))
        self.addParameter(QgsProcessingParameterFile(
            INIT, "Fine-tune: model package to start from (empty: none)",
            behavior=QgsProcessingParameterFile.Behavior.File, fileFilter=MODEL_FILTER, optional=True))
        self.addParameter(QgsProcessingParameterBoolean(
            INIT_DEFAULT, "Fine-tune: start from the embedded model", defaultValue=TrainConfig.init == DEFAULT_INIT))
        self.addParameter(QgsProcessingParameterNumber(
            FREEZE_EPOCHS, "Freeze the backbone for the first epochs", type=integer,
            defaultValue=TrainConfig.freeze_epochs, minValue=0))
        self.addParameter(QgsProcessingParameterNumber(
            EPOCHS, "Epochs", type=integer, defaultValue=TrainConfig.epochs, minValue=1))
        self.addParameter(QgsProcessingParameterNumber(
            BATCH_SIZE, "Batch size", type=integer, defaultValue=TrainConfig.batch_size, minValue=1))
        self.addParameter(advanced(QgsProcessingParameterNumber(
            SUBSET_PER_CLASS, "Use at most this many images per class (empty: all)",
            type=integer, defaultValue=TrainConfig.subset_per_class, minValue=1, optional=True)))
        self.addParameter(advanced(QgsProcessingParameterNumber(
            TILE_FOOTPRINT, "Tile footprint (ground size of one image in metres; empty: unknown)",
            type=double, defaultValue=TrainConfig.tile_footprint_m, minValue=0.0, optional=True)))
        self.addParameter(advanced(QgsProcessingParameterNumber(
            SEED, "Random seed", type=integer, defaultValue=TrainConfig.seed, minValue=0)))
        self.add_device_parameter(DEVICE)
        self.addParameter(QgsProcessingParameterFolderDestination(
            OUTPUT_FOLDER, "Run folder (checkpoint, metrics log, test report, model package)"))
        self.addOutput(QgsProcessingOutputFile(OUTPUT_MODEL, "Model package"))
        self.addOutput(QgsProcessingOutputNumber(VALIDATION_ACCURACY, "Best validation accuracy"))
        self.addOutput(QgsProcessingOutputNumber(TEST_ACCURACY, "Test accuracy"))

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802 (QGIS's name)
        use_python_for_child_processes()
        with user_errors(self, PARAMETERS):
            from casd_core.finetune import DEFAULT_INIT
            from casd_core.train import TrainConfig, train

            subset = self.parameterAsInt(parameters, SUBSET_PER_CLASS, context)
            footprint = self.parameterAsDouble(parameters, TILE_FOOTPRINT, context)
            init = self.parameterAsFile(parameters, INIT, context) or (
                DEFAULT_INIT if self.parameterAsBoolean(parameters, INIT_DEFAULT, context) else None)
            config = TrainConfig(
                data_root=self.parameterAsFile(parameters, DATA_FOLDER, context),
                split_csv=self.parameterAsFile(parameters, SPLIT_CSV, context) or None,
                out_dir=self.parameterAsString(parameters, OUTPUT_FOLDER, context),
                method=self._methods[self.parameterAsEnum(parameters, METHOD, context)],
                backbone=self._backbones[self.parameterAsEnum(parameters, BACKBONE, context)],
                pretrained="imagenet" if self.parameterAsBoolean(parameters, PRETRAINED, context) else None,
                epochs=self.parameterAsInt(parameters, EPOCHS, context),
                batch_size=self.parameterAsInt(parameters, BATCH_SIZE, context),
                subset_per_class=subset or None,  # an empty optional number reads as 0
                tile_footprint_m=footprint or None,
                seed=self.parameterAsInt(parameters, SEED, context),
                init=init, freeze_epochs=self.parameterAsInt(parameters, FREEZE_EPOCHS, context),
                device=self.device(parameters, DEVICE, context),
            )
            start = f" from {config.init}" if config.init else ""
            feedback.pushInfo(f"Training {config.method} on {config.backbone}{start} for {config.epochs} epoch(s) "
                              f"into {config.out_dir}")
            result = train(config, monitor_for(feedback))
        validation = result.metrics.get("validation", {}).get("overall_accuracy")
        test = result.metrics.get("test", {}).get("overall_accuracy")
        if validation is not None:
            feedback.pushInfo(f"Best validation accuracy: {validation:.2%}")
        if test is not None:
            feedback.pushInfo(f"Test accuracy: {test:.2%} (kappa {result.metrics['test']['kappa']:.3f})")
        feedback.pushInfo(f"Model package: {result.package_path}")
        return {OUTPUT_FOLDER: str(config.out_dir), OUTPUT_MODEL: str(result.package_path),
                VALIDATION_ACCURACY: validation, TEST_ACCURACY: test}
