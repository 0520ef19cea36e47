"""The Triton kernels of decoding attention: both read K/V through the list of S_l's positions, so that a pruned
layer reads only its candidates. `split_attention`: one or a few rows per sequence (a step's q and its revived
rows), split over the keys. `burst_attention`: many rows (the revival bursts of rules without a bound, such as
`paper`), a flash kernel with per-row key ranges. Imported only where Triton runs (CUDA, or its interpreter)."""
