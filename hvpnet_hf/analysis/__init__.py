"""
The paper's experiments and analyses, one command each (`python -m hvpnet_hf.analysis.<name> --help`):

- `seeds`: a config over several seeds, mean and standard deviation per split (Table 1's protocol).
- `ablations`: the variants of Table 1 (Flat, 1T3, OnlyObj, no visual prefix, images masked) over seeds.
- `low_resource`: image-aware and text-only models on nested 5-50% training subsets (Figure 3).
- `cross_task`: an MRE model started from a trained MNER model, or the reverse (Table 3).
- `robustness`: a trained model with its images shuffled, blanked or masked (the error-sensitivity claim).
- `gates`: the mean dynamic-gate weight per text layer and backbone stage (Figure 4).
- `attention`: one example's entity-to-image-prefix attention per layer (Table 2).

The first four train with `examples/run_mner.py` / `examples/run_mre.py` and need a clone of the repository; the
last three only need a trained model folder. Plots need matplotlib (`pip install hvpnet_hf[analysis]`), which
nothing else in the package imports.
"""
