"""The tools around the compiler: the `bpcompile` command line (`cli`), the YAML/Python/ONNX
model specs (`spec`: loaders, the YAML reader, the layer table `spec.LAYERS`, the limits), ONNX
import (`onnx_import`: the importer and one module per operator family) and export
(`onnx_export`), the gradient explanations of `show --grad` (`explain`, with the tensor
formulas of `formulas`), the gradient checker (`gradcheck`) and the standalone C export with its
binary parameter files (`export`)."""
