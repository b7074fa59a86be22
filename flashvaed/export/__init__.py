"""ONNX export of streaming decoders: two graphs, plugin nodes with function bodies, the I/O contract."""
