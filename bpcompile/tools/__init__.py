"""The tools around the compiler: the `bpcompile` command line (`cli`), the YAML/Python model
specs (`spec`), the gradient explanations of `show --grad` (`explain`) and the standalone C
export with its binary parameter files (`export`)."""
