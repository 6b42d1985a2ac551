"""The limits a spec's numbers and expressions are held to, so that a spec file cannot make
the loader (or SymPy, or the compiler) run forever or allocate without bound."""

# Limits on spec expressions, so that a spec cannot make the parser (or later SymPy) run forever:
MAX_EXPR_CHARS = 2000        # characters of one expression
MAX_EXPR_DEPTH = 60          # nesting of operators and calls
MAX_NUMBER_BITS = 4096       # bits of an exact number a power of numbers may produce
MAX_SYMBOLIC_EXPONENT = 64   # |n| of a rational power n of an expression with symbols


# Limits on the counts of a YAML spec (each count an integer of 1 to MAX_UNITS, the seed 0 to MAX_SEED):
MAX_UNITS = 1 << 24      # a layer's outputs, a fixed dimension, a vocabulary, heads, the MLP ratio
MAX_ELEMENTS = 1 << 32   # elements of one weight, or of an input's fixed dimensions together
MAX_SEED = 2**63 - 1
