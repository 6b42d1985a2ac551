"""The layer vocabulary of YAML specs: the layer kinds and their settings."""

DENSE_KEYS = {"units": "the number of outputs", "activation": "an elementwise op", "init": "the weight init",
              "bias": "true or false", "bias_init": "the bias init", "name": "a prefix for its parameter names"}
UNARY = ["relu", "sigmoid", "tanh", "softplus", "gelu", "silu", "exp", "log", "sqrt", "square", "abs", "neg"]
PARAMETRIC = {"leaky_relu": ("negative_slope", "leaky_relu"), "elu": ("alpha", "elu")}
SHAPED = {"flatten": "flatten", "softmax": "softmax", "log_softmax": "log_softmax"}
NAME_KEY = {"name": "a prefix for its parameter names"}
TRANSFORMER_KEYS = {  # the layers of a GPT, as bp.nn builds them
    "embedding": {"vocab": "the number of token ids", "dim": "the embedding width",
                  "positions": "add learned position embeddings for this many steps", **NAME_KEY},
    "layer_norm": {"eps": "a positive number (1e-5)", **NAME_KEY},
    "transformer_block": {"heads": "the number of attention heads", "mlp_ratio": "the MLP width / dim (4)",
                          "dropout": "a probability (0)", "causal": "true (default) or false", **NAME_KEY},
    "lm_head": {"units": "outputs (default: tied to the embedding's table)", **NAME_KEY},
}
