"""ONNX exports of model packages, for onnxruntime (no PyTorch needed to classify).

    metadata.py  the package's JSON document and Deepness's keys in ``metadata_props``; read back
    safety.py    what an ONNX file may contain before it is handed to onnxruntime
    export.py    package → self-describing ONNX graph (torch), fp16 storage for the bundled copy
    quantize.py  static int8 (QDQ, per channel), calibrated on training images

``metadata`` and ``safety`` need only the ``onnx`` package; ``export`` and ``quantize`` need
torch and run where training runs.
"""
