"""The compress stage's library: pruning, distillation, ONNX export and int8, variants, the deployable selection."""
