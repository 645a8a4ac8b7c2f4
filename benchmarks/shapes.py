"""Named layer shapes shared by the benchmarks (no sizes hard-coded in scripts)."""

# Llama-7B projections: (name, in_features, out_features)
LLAMA7B = [
    ("q_proj 4096x4096", 4096, 4096),
    ("up_proj 4096->11008", 4096, 11008),
    ("down_proj 11008->4096", 11008, 4096),
]
TOKENS = [512, 4096]
RANKS = [16, 64]
