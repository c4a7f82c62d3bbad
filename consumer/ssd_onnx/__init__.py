"""Detect with a TinySSD of the ``ssd`` project from its ONNX file, on onnxruntime, numpy and Pillow only.

``ssd_onnx.model`` (the file, its metadata, detections and records), ``ssd_onnx.images`` (images
read as ``ssd predict`` reads them), ``ssd_onnx.registry`` (``models:/...`` as the version's ONNX
file, extra ``[registry]``), ``ssd_onnx.cli`` (``ssd-onnx predict``). Neither torch nor ``ssd`` is
imported: what it shares with ``ssd`` is copied, each copy naming its original, and the project's
tests check they agree.
"""
__version__ = "0.1.0"
