"""Names the command line needs without importing torch: the modes of each kind of case."""

ANALYSIS_MODES = ("reference", "sdpa-forward", "sdpa-frozen", "fastbertology", "fastbertology-eager",
                  "fastbertology-padded")
MASKING_MODES = ("reference", "fastbertology", "fastbertology-eager")
GRAPH_AB_MODE = "fastbertology-eager"  # fastbertology with --cuda-graphs off: the A/B of CUDA-graph replay
SWEEP_MODES = ("reference", "fastbertology")
HEAD_TYPE_MODES = ("reference", "fastbertology")
PATCHING_MODES = ("reference", "fastbertology")
GATES_MODES = ("reference", "fastbertology")
