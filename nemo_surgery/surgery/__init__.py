"""Byte-level editing of safetensors checkpoints: headers, layouts, patching, verification.

Nothing here loads a model: headers are parsed directly and tensor bytes are
streamed in bounded chunks, so memory does not grow with checkpoint size.
"""
