"""What the tests cover of the ops: every registered op, and one example of every layer form (ops.py's
grammar)."""

# One example of every activation form the ops accept (the grammar above); parameters in the parametrised
# ones are chosen away from torch's defaults so that tests exercise them.
ACTIVATIONS = (
    "relu", "tanh", "sigmoid", "gelu", "gelu_tanh", "silu", "relu6",
    "leaky_relu:0.2", "elu:1.5", "softplus:2.0:3.0", "hardtanh:-0.5:1.25", "hardswish", "hardsigmoid",
    "mish",
)
LAYER_NAMES = ("linear", "linear_no_bias") + ACTIVATIONS + ("softmax", "log_softmax")
OP_NAMES = (
    "linear_jac_forward",
    "linear_jac_reverse",
    "pointwise_jac_forward",
    "pointwise_jac_reverse",
    "softmax_jac_forward",
    "softmax_jac_reverse",
    "log_softmax_jac_forward",
    "log_softmax_jac_reverse",
    "sequential_jac_forward",
    "sequential_jac_reverse",
    "batch_jacobian",
    "conv_jac_forward",
    "conv_jac_reverse",
    "batch_norm_jac_forward",
    "batch_norm_jac_reverse",
    "max_pool2d_jac_forward",
    "max_pool2d_jac_reverse",
    "avg_pool2d_jac_forward",
    "avg_pool2d_jac_reverse",
    "adaptive_avg_pool2d_jac_forward",
    "adaptive_avg_pool2d_jac_reverse",
    "layer_norm_jac_forward",
    "layer_norm_jac_reverse",
)
