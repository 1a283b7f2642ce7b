"""Serving a model: load it from an MLflow URI or an ONNX file (kiln.serve.model), read and check images
(kiln.serve.images), classify them (kiln.serve.classify). No command line and no stage: `kiln predict` and any server
import it."""
